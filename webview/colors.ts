// The charts' palette from VS Code's theme variables. Pure: the webview passes a reader over
// getComputedStyle(document.body), the tests a table.
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
  /** The workbench font, for the charts' ticks, titles, legends and tooltips. */
  fontFamily: string;
  /** In CSS pixels. */
  fontSize: number;
}

/** Where a host defines no variable (a browser test page): VS Code's default theme of each kind. */
const FALLBACK: Record<ThemeKind, Record<string, string>> = {
  dark: {
    '--vscode-foreground': '#cccccc', '--vscode-descriptionForeground': '#9d9d9d', '--vscode-editor-background': '#1f1f1f',
    '--vscode-panel-border': '#2b2b2b', '--vscode-charts-red': '#f14c4c', '--vscode-charts-blue': '#3794ff',
    '--vscode-charts-green': '#89d185', '--vscode-charts-yellow': '#cca700', '--vscode-charts-orange': '#d18616',
    '--vscode-charts-purple': '#b180d7',
  },
  light: {
    '--vscode-foreground': '#3b3b3b', '--vscode-descriptionForeground': '#717171', '--vscode-editor-background': '#ffffff',
    '--vscode-panel-border': '#e5e5e5', '--vscode-charts-red': '#e51400', '--vscode-charts-blue': '#1a85ff',
    '--vscode-charts-green': '#388a34', '--vscode-charts-yellow': '#bf8803', '--vscode-charts-orange': '#c55f00',
    '--vscode-charts-purple': '#652d90',
  },
  'high-contrast': {
    '--vscode-foreground': '#ffffff', '--vscode-descriptionForeground': '#ffffff', '--vscode-editor-background': '#000000',
    '--vscode-panel-border': '#6fc3df', '--vscode-charts-red': '#f48771', '--vscode-charts-blue': '#3794ff',
    '--vscode-charts-green': '#89d185', '--vscode-charts-yellow': '#ffd370', '--vscode-charts-orange': '#ffa500',
    '--vscode-charts-purple': '#b180d7',
  },
  'high-contrast-light': {
    '--vscode-foreground': '#292929', '--vscode-descriptionForeground': '#292929', '--vscode-editor-background': '#ffffff',
    '--vscode-panel-border': '#0f4a85', '--vscode-charts-red': '#b5200d', '--vscode-charts-blue': '#0f4a85',
    '--vscode-charts-green': '#374e06', '--vscode-charts-yellow': '#895503', '--vscode-charts-orange': '#8a3b00',
    '--vscode-charts-purple': '#652d90',
  },
};

/**
 * Variables tried, in order, before the fallback. High contrast themes leave most --vscode-charts-* colours
 * undefined; their warning and error colours are defined and chosen to stand out.
 */
const ALTERNATIVES: Record<string, readonly string[]> = {
  '--vscode-charts-orange': ['--vscode-editorWarning-foreground'],
  '--vscode-charts-red': ['--vscode-editorError-foreground'],
  '--vscode-charts-blue': ['--vscode-editorInfo-foreground'],
};

/** The theme from the classes VS Code puts on the webview's body. */
export function themeKind(bodyClasses: readonly string[]): ThemeKind {
  if (bodyClasses.includes('vscode-high-contrast-light')) return 'high-contrast-light';
  if (bodyClasses.includes('vscode-high-contrast')) return 'high-contrast';
  if (bodyClasses.includes('vscode-light')) return 'light';
  return 'dark';
}

/**
 * The colour without its alpha: themes define some chart colours translucent (Dark Modern's orange is
 * rgba(234, 92, 0, 0.33)), which drawn as a thin line nearly vanishes. Anything not hex or rgb()/rgba() is kept.
 */
export function opaque(color: string): string {
  const c = color.trim();
  if (/^#[0-9a-f]{4}$/i.test(c) || /^#[0-9a-f]{8}$/i.test(c)) return c.slice(0, c.length === 5 ? 4 : 7);
  const m = /^rgba?\(\s*([\d.]+)[\s,]+([\d.]+)[\s,]+([\d.]+)\s*(?:[,/]\s*[\d.]+%?\s*)?\)$/i.exec(c);
  return m ? `rgb(${m[1]}, ${m[2]}, ${m[3]})` : c;
}

/** High contrast themes' warning colour is their yellow: orange must still differ from it (memory categories). */
const distinct = (color: string, other: string, fallback: string) => (color.toLowerCase() === other.toLowerCase() ? fallback : color);

/** "13px" → 13; the fallback for anything else. */
function pixels(value: string, fallback: number): number {
  const n = Number.parseFloat(value);
  return Number.isFinite(n) && n > 0 && /px\s*$/.test(value.trim()) ? n : fallback;
}

export function readPalette(cssVar: (name: string) => string, kind: ThemeKind): Palette {
  const v = (name: string) => {
    for (const n of [name, ...(ALTERNATIVES[name] ?? [])]) {
      const value = cssVar(n).trim();
      if (value) return opaque(value);
    }
    return FALLBACK[kind][name];
  };
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
    orange: distinct(v('--vscode-charts-orange'), v('--vscode-charts-yellow'), FALLBACK[kind]['--vscode-charts-orange']),
    purple: v('--vscode-charts-purple'),
    fontFamily: cssVar('--vscode-font-family').trim() || 'system-ui, sans-serif',
    fontSize: pixels(cssVar('--vscode-font-size'), 13),
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
