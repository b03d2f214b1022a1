// Building the webviews' DOM: elements with text set through textContent only (event and model text is never
// parsed as HTML). Shared by the training panel and the chat panel.
import './dom.css';

export function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: { id?: string; className?: string; text?: string } = {}, ...children: Node[]): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (props.id) node.id = props.id;
  if (props.className) node.className = props.className;
  if (props.text !== undefined) node.textContent = props.text;
  node.append(...children);
  return node;
}

/** Text for screen readers only (dom.css's .visually-hidden). */
export function hiddenText(text: string, props: { id?: string } = {}): HTMLElement {
  return el('span', { ...props, className: 'visually-hidden', text });
}

/**
 * Disables or enables a control. vscode-button and vscode-single-select take `disabled` but do not expose it to
 * assistive technology (the button drops out of the tab order silently), hence aria-disabled beside it.
 */
export function setDisabled(control: HTMLElement, disabled: boolean): void {
  control.toggleAttribute('disabled', disabled);
  if (disabled) control.setAttribute('aria-disabled', 'true');
  else control.removeAttribute('aria-disabled');
}

/**
 * vscode-button clicks on its own keydown of Enter and Space. Space must not also scroll the page, and a held key's
 * auto-repeat must not click again and again (a held Enter on Stop or Send). Capture phase: runs before the
 * button's own listener.
 */
export function guardButtonKeys(root: Document): void {
  root.addEventListener('keydown', (e) => {
    if (!(e.target instanceof HTMLElement) || e.target.tagName !== 'VSCODE-BUTTON') return;
    if (e.key !== 'Enter' && e.key !== ' ') return;
    if (e.key === ' ') e.preventDefault();
    if (e.repeat) {
      e.preventDefault();
      e.stopImmediatePropagation();
    }
  }, true);
}

/** Resolves once a vscode-elements (lit) component has drawn its latest state. */
export function rendered(host: HTMLElement): Promise<unknown> {
  return (host as HTMLElement & { updateComplete?: Promise<unknown> }).updateComplete ?? Promise.resolve();
}

/** The focusable control inside a vscode-elements component (its shadow root's input, textarea or combobox). */
export async function innerControl(host: HTMLElement): Promise<HTMLElement | null> {
  await rendered(host);
  return host.shadowRoot?.querySelector<HTMLElement>('input, textarea, [role="combobox"]') ?? null;
}
