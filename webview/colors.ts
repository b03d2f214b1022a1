// The charts' palette from VS Code's theme variables. Pure: the webview passes a reader over
// getComputedStyle(document.body), the tests a table. The fallbacks are VS Code's Dark Modern values, used only
// where a host does not define a variable (a browser test page).
import type { MemoryCategory } from '../extension/protocol/events';

export type ThemeKind = 'light' | 'dark' | 'high-contrast' | 'high-contrast-light';

export interface Palette {
  kind: ThemeKind;
  foreground: string;
  muted: string;
  background: string;
  grid: string;
  red: string;
  blue: string;
  green: string;
  yellow: string;
  orange: string;
  purple: string;
}

const FALLBACK: Record<string, string> = {
  '--vscode-foreground': '#cccccc',
  '--vscode-descriptionForeground': '#9d9d9d',
  '--vscode-editor-background': '#1f1f1f',
  '--vscode-panel-border': '#2b2b2b',
  '--vscode-charts-red': '#f14c4c',
  '--vscode-charts-blue': '#3794ff',
  '--vscode-charts-green': '#89d185',
  '--vscode-charts-yellow': '#cca700',
  '--vscode-charts-orange': '#d18616',
  '--vscode-charts-purple': '#b180d7',
};

/** The theme from the classes VS Code puts on the webview's body. */
export function themeKind(bodyClasses: readonly string[]): ThemeKind {
  if (bodyClasses.includes('vscode-high-contrast-light')) return 'high-contrast-light';
  if (bodyClasses.includes('vscode-high-contrast')) return 'high-contrast';
  if (bodyClasses.includes('vscode-light')) return 'light';
  return 'dark';
}

export function readPalette(cssVar: (name: string) => string, kind: ThemeKind): Palette {
  const v = (name: string) => cssVar(name).trim() || FALLBACK[name];
  return {
    kind,
    foreground: v('--vscode-foreground'),
    muted: v('--vscode-descriptionForeground'),
    background: v('--vscode-editor-background'),
    // High contrast themes have bright borders; grid lines there should stay as visible as the theme wants.
    grid: v('--vscode-panel-border'),
    red: v('--vscode-charts-red'),
    blue: v('--vscode-charts-blue'),
    green: v('--vscode-charts-green'),
    yellow: v('--vscode-charts-yellow'),
    orange: v('--vscode-charts-orange'),
    purple: v('--vscode-charts-purple'),
  };
}

/** Memory categories in stacking order (bottom first), each with its theme colour. */
export function categoryColors(p: Palette): Record<MemoryCategory, string> {
  return { weights: p.blue, adapters: p.green, gradients: p.yellow, optimizer: p.orange, activations: p.purple, workspace: p.muted };
}

function hexToRgb(hex: string): [number, number, number] | null {
  const h = hex.slice(1);
  if (/^[0-9a-f]{3,4}$/i.test(h)) return [0, 1, 2].map((i) => parseInt(h[i] + h[i], 16)) as [number, number, number];
  if (/^[0-9a-f]{6}([0-9a-f]{2})?$/i.test(h)) return [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16)) as [number, number, number];
  return null;
}

/**
 * The colour at the given opacity, for translucent fills: hex and rgb()/rgba() are rewritten; anything else
 * (a named colour) is returned as is, opaque, rather than guessed at. High contrast themes get no translucency.
 */
export function withAlpha(color: string, alpha: number, kind?: ThemeKind): string {
  if (kind === 'high-contrast' || kind === 'high-contrast-light') return color;
  const c = color.trim();
  const rgb = c.startsWith('#')
    ? hexToRgb(c)
    : (/^rgba?\(\s*(\d+)[\s,]+(\d+)[\s,]+(\d+)/i.exec(c)?.slice(1, 4).map(Number) as [number, number, number] | undefined) ?? null;
  return rgb ? `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${alpha})` : c;
}
