// The chat panel app: two columns, the base model and the finetuned one, answering each prompt as they stream. The
// host owns the conversation (extension/host/chat/chatSession.ts); this draws what it sends and sends what the user
// does. Text is only ever set with textContent. Test hooks: body data-* attributes and window.qloraChat.
import '@vscode-elements/elements/dist/vscode-button/index.js';
import '@vscode-elements/elements/dist/vscode-collapsible/index.js';
import '@vscode-elements/elements/dist/vscode-option/index.js';
import '@vscode-elements/elements/dist/vscode-single-select/index.js';
import '@vscode-elements/elements/dist/vscode-textarea/index.js';
import '@vscode-elements/elements/dist/vscode-textfield/index.js';
import {
  CHAT_COLUMNS,
  SETTING_LIMITS,
  validateChatHostMessage,
  type AnswerStats,
  type ChatColumnId,
  type ChatHostToWebview,
  type ChatModelInfo,
  type ChatSettings,
  type ChatWebviewToHost,
} from '../../extension/protocol/chat';
import { el, guardButtonKeys, hiddenText, innerControl, rendered, setDisabled } from '../dom';
import { answerDoneMessage, describeStats, parseStopStrings } from './format';
import './chat.css';

interface VsCodeApi {
  postMessage(message: ChatWebviewToHost): void;
  getState(): unknown;
  setState(state: unknown): void;
}
declare function acquireVsCodeApi(): VsCodeApi;
const vscode = acquireVsCodeApi();

/** vscode-textarea / vscode-textfield / vscode-single-select: all expose `value`. */
type ValueElement = HTMLElement & { value: string };

/**
 * A vscode-* control named for assistive technology. Focus goes to the input inside its shadow root, whose
 * aria-label the component fills from its `label` property only (an aria-label on the host names nothing focused).
 */
function control(tag: string, label: string, attrs: Record<string, string> = {}): ValueElement {
  const node = custom(tag, attrs);
  (node as ValueElement & { label: string }).label = label;
  return node;
}

function custom(tag: string, attrs: Record<string, string> = {}, text?: string): ValueElement {
  const node = document.createElement(tag) as ValueElement;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const COLUMN_TITLES: Record<ChatColumnId, string> = { base: 'Base model', finetuned: 'Finetuned' };
const PROMPT_HINT = 'Enter sends, Shift+Enter adds a line, Escape stops the answers.';

// ---------------------------------------------------------------------------------------------------------------
// DOM

const ui = (() => {
  const title = el('h1', { id: 'chat-title' });
  const modelNote = el('div', { id: 'model-note', className: 'muted' });
  const checkpoint = control('vscode-single-select', 'Adapter', { id: 'checkpoint' });
  const clear = custom('vscode-button', { id: 'clear', secondary: '' }, 'Clear');
  const toolbar = el('div', { className: 'toolbar' }, el('span', { className: 'muted', text: 'Adapter' }), checkpoint, clear);

  const system = control('vscode-textarea', 'System prompt', { id: 'system', rows: '2', placeholder: 'System prompt (optional)' });
  // Steps count from each minimum (the input's step base): top-p's 0.05 from 0.001 made the defaults (top-p 0.95,
  // repetition penalty 1) fail the browser's step check. Fine steps keep every two-decimal value valid; vscode-textfield
  // takes a number for step, so "any" is not an option.
  const field = (id: string, label: string, limits: readonly [number, number], step: string) => {
    const input = control('vscode-textfield', label, { id, type: 'number', min: String(limits[0]), max: String(limits[1]), step });
    return { input, label, row: el('label', { className: 'setting' }, el('span', { text: label }), input) };
  };
  const L = SETTING_LIMITS;
  const fields = {
    temperature: field('temperature', 'Temperature', L.temperature, '0.01'),
    topP: field('top-p', 'Top-p', L.topP, '0.001'),
    topK: field('top-k', 'Top-k', L.topK, '1'),
    minP: field('min-p', 'Min-p', L.minP, '0.001'),
    repetitionPenalty: field('repetition-penalty', 'Repetition penalty', L.repetitionPenalty, '0.01'),
    maxNewTokens: field('max-new-tokens', 'Max new tokens', L.maxNewTokens, '1'),
    seed: field('seed', 'Seed', L.seed, '1'),
  };
  const stops = control('vscode-textfield', 'Stop strings', { id: 'stop-strings', placeholder: 'e.g. "###", "User:"' });
  const settings = custom('vscode-collapsible', { id: 'settings', heading: 'System prompt and sampling' });
  settings.append(
    el('div', { className: 'settings-body' },
      el('label', { className: 'setting wide' }, el('span', { text: 'System prompt' }), system),
      el('div', { className: 'settings-grid' }, ...Object.values(fields).map((f) => f.row)),
      el('label', { className: 'setting wide' }, el('span', { text: 'Stop strings (comma-separated, quoted if they hold commas)' }), stops),
      el('p', { className: 'muted', text: 'Temperature 0 is greedy. Both columns use the same settings and seed.' })),
  );

  const status = el('div', { id: 'status', className: 'muted' });
  status.setAttribute('role', 'status');
  const error = el('div', { id: 'error', className: 'error' });
  error.setAttribute('role', 'alert');
  error.hidden = true;
  // finished answers and copies, said politely; never the streamed text itself
  const announcer = el('div', { id: 'announcer', className: 'visually-hidden' });
  announcer.setAttribute('role', 'status');

  const columns = {} as Record<ChatColumnId, { root: HTMLElement; messages: HTMLElement }>;
  for (const id of CHAT_COLUMNS) {
    const messages = el('div', { className: 'messages' });
    const root = el('section', { className: 'column' }, el('h2', { text: COLUMN_TITLES[id] }), messages);
    root.dataset.column = id;
    columns[id] = { root, messages };
  }
  const columnsRow = el('main', { id: 'columns' }, columns.base.root, columns.finetuned.root);

  const suggestions = el('div', { id: 'suggestions' });
  const prompt = control('vscode-textarea', 'Prompt', { id: 'prompt', rows: '3', placeholder: 'Ask both models…' });
  const hint = el('div', { id: 'prompt-hint', className: 'muted', text: PROMPT_HINT });
  const send = custom('vscode-button', { id: 'send' }, 'Send');
  const stop = custom('vscode-button', { id: 'stop', secondary: '' }, 'Stop');
  const composer = el('footer', { id: 'composer' }, el('div', { className: 'prompt-box' }, prompt, hint), el('div', { className: 'composer-actions' }, send, stop));

  document.body.append(el('header', {}, el('div', { className: 'title-row' }, title, toolbar), modelNote), settings, status, error, announcer, columnsRow, suggestions, composer);
  return { title, modelNote, checkpoint, clear, system, fields, stops, settings, status, error, announcer, columns, suggestions, prompt, send, stop };
})();

// ---------------------------------------------------------------------------------------------------------------
// State

interface Answer {
  text: string;
  stats: AnswerStats | null;
  textNode: HTMLElement;
  statsNode: HTMLElement;
}

let state: 'loading' | 'ready' | 'error' = 'loading';
let info: ChatModelInfo | null = null;
/** answers[turn][column] */
let answers: Partial<Record<ChatColumnId, Answer>>[] = [];
const busy = () => answers.some((t) => Object.values(t).some((a) => a !== undefined && a.stats === null));

function showError(message: string | null): void {
  ui.error.hidden = message === null;
  ui.error.textContent = message ?? '';
}

/** The host's answer to a Copy, on the button for a moment and said to screen readers. */
function showCopied(column: ChatColumnId, turn: number, ok: boolean): void {
  const button = document.querySelector<HTMLElement>(`[data-copy="${column}:${turn}"]`);
  const text = ok ? 'Copied' : 'Not copied';
  announce(ok ? `Copied ${answerName(column, turn)}` : `${answerName(column, turn)} was not copied`);
  if (!button) return;
  button.textContent = text;
  setTimeout(() => {
    if (button.textContent === text) button.textContent = 'Copy';
  }, COPIED_MS);
}

/** How long a Copy button says what became of its copy. */
const COPIED_MS = 1500;

/** Polite: appended, so an answer finishing right after another does not replace its message unread. */
function announce(text: string): void {
  ui.announcer.append(el('div', { text }));
  while (ui.announcer.childElementCount > 3) ui.announcer.firstElementChild?.remove();
}

/** A setting the app refuses: marked invalid (drawn and exposed), focused, the reason in the alert. */
function showInvalid(problem: SettingsProblem): void {
  showError(problem.message);
  ui.settings.setAttribute('open', '');
  setInvalid(problem.field, true);
  // focusable once the collapsible has drawn itself open
  void rendered(ui.settings).then(() => problem.field.focus());
}

function setInvalid(field: ValueElement, invalid: boolean): void {
  (field as ValueElement & { invalid: boolean }).invalid = invalid;
  // the host's aria-invalid would not reach the focused input inside it
  void innerControl(field).then((inner) => {
    if (invalid) inner?.setAttribute('aria-invalid', 'true');
    else inner?.removeAttribute('aria-invalid');
  });
}

/**
 * What the user typed, kept across the reload VS Code does when a hidden panel comes back (its document is not
 * retained): system prompt, sampling fields and stop strings as typed, and the unsent prompt. The host keeps the
 * conversation; without these the next question would go out with the model's defaults and another system prompt.
 */
interface TypedState {
  system: string;
  fields: Record<string, string>;
  stops: string;
  prompt: string;
}

function savedTypedState(): TypedState | null {
  const v = vscode.getState() as Partial<TypedState> | null | undefined;
  if (!v || typeof v.system !== 'string' || typeof v.stops !== 'string' || typeof v.prompt !== 'string' || typeof v.fields !== 'object' || v.fields === null) return null;
  const fields: Record<string, string> = {};
  for (const key of Object.keys(ui.fields)) {
    const value = (v.fields as Record<string, unknown>)[key];
    if (typeof value !== 'string') return null;
    fields[key] = value;
  }
  return { system: v.system, fields, stops: v.stops, prompt: v.prompt };
}

function saveTypedState(): void {
  if (info === null) return; // the fields are filled once the model's info comes; until then there is nothing to keep
  const fields = Object.fromEntries(Object.entries(ui.fields).map(([key, f]) => [key, f.input.value]));
  vscode.setState({ system: ui.system.value, fields, stops: ui.stops.value, prompt: ui.prompt.value } satisfies TypedState);
}

function restoreTypedState(saved: TypedState): void {
  ui.system.value = saved.system;
  for (const [key, f] of Object.entries(ui.fields)) f.input.value = saved.fields[key];
  ui.stops.value = saved.stops;
}

function fillSettings(d: ChatSettings): void {
  for (const [key, f] of Object.entries(ui.fields) as [keyof typeof ui.fields, { input: ValueElement }][]) f.input.value = String(d[key]);
  ui.stops.value = d.stopStrings.map((s) => JSON.stringify(s)).join(', ');
}

interface SettingsProblem {
  message: string;
  field: ValueElement;
}

/** The settings as typed, checked against the limits; the first bad field and a sentence naming it otherwise. */
function readSettings(): ChatSettings | SettingsProblem {
  const out: Record<string, number> = {};
  for (const [key, f] of Object.entries(ui.fields) as [keyof typeof ui.fields, { input: ValueElement; label: string }][]) {
    const n = Number(f.input.value);
    const [min, max] = SETTING_LIMITS[key];
    const whole = key === 'topK' || key === 'seed' || key === 'maxNewTokens';
    if (f.input.value.trim() === '' || !Number.isFinite(n) || n < min || n > max || (whole && !Number.isInteger(n))) {
      return { message: `${f.label} must be ${whole ? 'a whole number' : 'a number'} from ${min} to ${max}.`, field: f.input };
    }
    out[key] = n;
  }
  const stops = parseStopStrings(ui.stops.value);
  if (typeof stops === 'string') return { message: stops, field: ui.stops };
  return { ...(out as unknown as Omit<ChatSettings, 'stopStrings'>), stopStrings: stops };
}

function fillCheckpoints(i: ChatModelInfo): void {
  const options: { value: string; label: string }[] = [];
  if (i.hasFinalAdapter || i.checkpoints.length === 0) options.push({ value: 'final', label: i.adapterDir ? (i.hasFinalAdapter ? 'Final adapter' : 'Adapter') : 'No adapter' });
  for (const step of [...i.checkpoints].reverse()) options.push({ value: String(step), label: `Checkpoint step ${step}` });
  const selected = i.checkpoint === null ? options[0]?.value : String(i.checkpoint);
  ui.checkpoint.replaceChildren(...options.map((o) => {
    const opt = custom('vscode-option', { value: o.value }, o.label);
    if (o.value === selected) opt.setAttribute('selected', '');
    return opt;
  }));
  setDisabled(ui.checkpoint, options.length < 2);
}

function fillSuggestions(i: ChatModelInfo): void {
  ui.suggestions.replaceChildren(...(i.suggestions.length > 0 ? [el('span', { className: 'muted', text: 'From the eval data:' })] : []), ...i.suggestions.map((s) => {
    const b = custom('vscode-button', { secondary: '', title: s }, s.length > 60 ? s.slice(0, 57) + '…' : s);
    b.classList.add('suggestion');
    b.dataset.suggestion = s;
    return b;
  }));
}

/** "finetuned answer 2": the answer's name on its Copy button and in the Copied message. */
const answerName = (column: ChatColumnId, turn: number) => `${COLUMN_TITLES[column].toLowerCase()} answer ${turn + 1}`;

/** Each turn of a column is one article (prompt and answer), so a screen reader can tell where one ends. */
function addTurn(turn: number, prompt: string): void {
  answers[turn] = {};
  for (const id of CHAT_COLUMNS) {
    if (!activeColumns().includes(id)) continue;
    const textNode = el('div', { className: 'answer-text' });
    const statsNode = el('div', { className: 'answer-stats muted', text: 'writing…' });
    const copy = custom('vscode-button', { secondary: '', title: 'Copy this answer', 'aria-label': `Copy ${answerName(id, turn)}` }, 'Copy');
    copy.classList.add('copy');
    copy.dataset.copy = `${id}:${turn}`;
    const user = el('div', { className: 'user' }, hiddenText('You: '), document.createTextNode(prompt));
    const answer = el('div', { className: 'answer' }, hiddenText('Answer: '), textNode, el('div', { className: 'answer-footer' }, statsNode, copy));
    const article = el('article', { className: 'turn' }, user, answer);
    article.setAttribute('aria-label', `${COLUMN_TITLES[id]}, turn ${turn + 1}`);
    const messages = ui.columns[id].messages;
    messages.append(article);
    messages.scrollTop = messages.scrollHeight;
    answers[turn][id] = { text: '', stats: null, textNode, statsNode };
  }
}

function activeColumns(): ChatColumnId[] {
  return info?.adapterDir ? ['base', 'finetuned'] : ['base'];
}

function clearConversation(): void {
  answers = [];
  for (const id of CHAT_COLUMNS) ui.columns[id].messages.replaceChildren();
}

function render(): void {
  const b = busy();
  setDisabled(ui.send, state !== 'ready' || b);
  setDisabled(ui.stop, !b);
  setDisabled(ui.clear, state !== 'ready' || answers.length === 0);
  ui.columns.finetuned.root.hidden = !activeColumns().includes('finetuned');
  document.body.classList.toggle('single-column', !activeColumns().includes('finetuned'));
  writeTestHooks();
}

function summary() {
  return {
    state,
    busy: busy(),
    turns: answers.length,
    columns: activeColumns(),
    answers: Object.fromEntries(CHAT_COLUMNS.map((c) => [c, answers.map((t) => t[c]?.text ?? null)])),
    finished: Object.fromEntries(CHAT_COLUMNS.map((c) => [c, answers.map((t) => t[c]?.stats?.finishReason ?? null)])),
    checkpoint: info?.checkpoint ?? null,
    suggestions: info?.suggestions.length ?? 0,
  };
}

function writeTestHooks(): void {
  const s = summary();
  const d = document.body.dataset;
  d.chatState = s.state;
  d.busy = String(s.busy);
  d.turns = String(s.turns);
  d.answered = String(answers.filter((t) => Object.values(t).every((a) => a?.stats !== null)).length);
}
Object.defineProperty(window, 'qloraChat', { get: () => JSON.parse(JSON.stringify(summary())) as ReturnType<typeof summary>, enumerable: false });

// ---------------------------------------------------------------------------------------------------------------
// Messages

function receive(m: ChatHostToWebview): void {
  switch (m.type) {
    case 'loading':
      state = 'loading';
      ui.status.textContent = m.message;
      showError(null);
      break;
    case 'loaded': {
      const first = info === null;
      info = m.info;
      state = 'ready';
      ui.title.textContent = m.info.title;
      ui.modelNote.textContent =
        (m.info.adapterDir ? `${m.info.modelDir} with the adapter ${m.info.adapterDir}` : `${m.info.modelDir} (no adapter: the base model only)`) +
        ` · on the ${m.info.device}`;
      // the CPU fallback's reason stays in the status line until the next load
      ui.status.textContent = m.info.deviceNote ?? '';
      fillCheckpoints(m.info);
      fillSuggestions(m.info);
      if (first) {
        // a panel reloaded after being hidden goes on with what the user had typed; a new one starts from the model's
        const saved = savedTypedState();
        if (saved) {
          restoreTypedState(saved);
        } else {
          fillSettings(m.info.defaults);
          if (m.info.system !== null && ui.system.value === '') ui.system.value = m.info.system;
        }
        saveTypedState();
      }
      break;
    }
    case 'turn':
      addTurn(m.turn, m.prompt);
      break;
    case 'delta': {
      const a = answers[m.turn]?.[m.column];
      if (!a) break;
      // follows the answer only when the column is scrolled to its end: someone reading back stays where they are
      const messages = ui.columns[m.column].messages;
      const atEnd = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 24;
      a.text += m.text;
      a.textNode.textContent = a.text;
      if (atEnd) messages.scrollTop = messages.scrollHeight;
      break;
    }
    case 'done': {
      const a = answers[m.turn]?.[m.column];
      if (!a) break;
      a.stats = m.stats;
      a.statsNode.textContent = describeStats(m.stats);
      announce(answerDoneMessage(COLUMN_TITLES[m.column], m.stats));
      break;
    }
    case 'cleared':
      clearConversation();
      break;
    case 'copied':
      showCopied(m.column, m.turn, m.ok);
      break;
    case 'error':
      if (info === null) state = 'error';
      ui.status.textContent = '';
      showError(m.message);
      break;
  }
  render();
}

function ask(prompt: string): void {
  if (prompt.trim() === '' || state !== 'ready' || busy()) return;
  const settings = readSettings();
  if ('message' in settings) {
    showInvalid(settings);
    return;
  }
  showError(null);
  vscode.postMessage({ type: 'ask', prompt, system: ui.system.value, settings });
  ui.prompt.value = '';
  saveTypedState();
}

window.addEventListener('message', (e: MessageEvent<unknown>) => {
  let m: ChatHostToWebview;
  try {
    m = validateChatHostMessage(e.data);
  } catch (err) {
    console.warn('qlora chat: dropped an invalid host message:', err instanceof Error ? err.message : err);
    return;
  }
  receive(m);
});

ui.send.addEventListener('click', () => ask(ui.prompt.value));
ui.stop.addEventListener('click', () => vscode.postMessage({ type: 'stop' }));
ui.clear.addEventListener('click', () => vscode.postMessage({ type: 'clear' }));
ui.prompt.addEventListener('keydown', (e: KeyboardEvent) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (!e.repeat) ask(ui.prompt.value);
  } else if (e.key === 'Escape' && busy()) {
    e.preventDefault();
    vscode.postMessage({ type: 'stop' });
  }
});
// The hint as the prompt's description: an aria-describedby on the host cannot point into its shadow root.
void innerControl(ui.prompt).then((inner) => inner?.setAttribute('aria-description', PROMPT_HINT));
guardButtonKeys(document);
ui.checkpoint.addEventListener('change', () => {
  const v = ui.checkpoint.value;
  vscode.postMessage({ type: 'checkpoint', step: v === 'final' || v === '' ? null : Number(v) });
});
document.body.addEventListener('click', (e) => {
  const target = e.target as Element | null;
  const suggestion = target?.closest<HTMLElement>('[data-suggestion]');
  if (suggestion?.dataset.suggestion) {
    ui.prompt.value = suggestion.dataset.suggestion;
    ui.prompt.focus();
    return;
  }
  const copy = target?.closest<HTMLElement>('[data-copy]')?.dataset.copy;
  if (copy) {
    const [column, turn] = copy.split(':');
    vscode.postMessage({ type: 'copy', column: column as ChatColumnId, turn: Number(turn) });
  }
});

for (const input of [ui.system, ui.stops, ui.prompt, ...Object.values(ui.fields).map((f) => f.input)]) {
  input.addEventListener('input', saveTypedState);
  input.addEventListener('change', saveTypedState);
}
// an edited setting is checked again on the next send; until then it is no longer marked
for (const input of [ui.stops, ...Object.values(ui.fields).map((f) => f.input)]) input.addEventListener('input', () => setInvalid(input, false));
// the unsent prompt at once; the rest waits for the model's info (see 'loaded')
ui.prompt.value = savedTypedState()?.prompt ?? '';

render();
vscode.postMessage({ type: 'ready' });
