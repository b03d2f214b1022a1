// The dataset preview's HTML, built in the host from the `inspect-data --json` report: shape and row counts, the
// token-length histogram against the max sequence length, invalid rows, and the first examples as the model sees
// them with the trained part marked. Static: no script runs in it, so the policy allows only its own nonce'd
// <style>. Pure (no vscode import) so it is unit-tested.
import type { DatasetReport, LengthHistogram } from '../../data';
import { escapeHtml } from '../panel/html';

export interface PreviewOptions {
  nonce: string;
  /** The max sequence length the run would use (qlora.maxSequenceLength). */
  maxLength: number;
  /** The model whose tokenizer and template were used; null when none is selected yet. */
  modelName: string | null;
}

export function previewContentSecurityPolicy(nonce: string): string {
  return `default-src 'none'; style-src 'nonce-${nonce}'`;
}

const int = (n: number) => n.toLocaleString('en-US');
const plural = (n: number, one: string, many = `${one}s`) => `${int(n)} ${n === 1 ? one : many}`;

const STYLE = `
body { font-family: var(--vscode-font-family); font-size: var(--vscode-font-size); color: var(--vscode-foreground);
  background: var(--vscode-editor-background); padding: 0 20px 24px; max-width: 980px; }
h1 { font-size: 1.4em; font-weight: 600; margin: 16px 0 4px; }
h2 { font-size: 1.1em; font-weight: 600; margin: 22px 0 8px; border-bottom: 1px solid var(--vscode-panel-border); padding-bottom: 4px; }
h3 { font-size: 1em; font-weight: 600; margin: 14px 0 4px; color: var(--vscode-descriptionForeground); }
.muted { color: var(--vscode-descriptionForeground); }
.warn { color: var(--vscode-editorWarning-foreground); }
table.stats td { padding: 1px 16px 1px 0; }
table.stats td:first-child { color: var(--vscode-descriptionForeground); }
/* A narrow editor scrolls the histogram rather than shrinking its text to a few pixels. */
.histogram-scroll { overflow-x: auto; max-width: 760px; margin-top: 8px; }
svg.histogram { width: 100%; min-width: 560px; height: auto; display: block; }
/* High contrast themes define few chart colours: each colour falls back to one they do define. Relative colour
   (where supported) drops a theme colour's alpha: Dark Modern's orange is 33% opaque. */
svg .bar { fill: var(--vscode-charts-blue, var(--vscode-editorInfo-foreground, var(--vscode-foreground))); }
svg .bar.over { fill: var(--vscode-charts-orange, var(--vscode-editorWarning-foreground, var(--vscode-foreground)));
  fill: rgb(from var(--vscode-charts-orange, var(--vscode-editorWarning-foreground, var(--vscode-foreground))) r g b / 1); }
body.vscode-high-contrast svg .bar { stroke: var(--vscode-contrastBorder); stroke-width: 1; }
svg .axis { stroke: var(--vscode-panel-border); stroke-width: 1; }
svg .limit { stroke: var(--vscode-charts-red, var(--vscode-editorError-foreground)); stroke-width: 1.5; stroke-dasharray: 5 3; }
svg text { fill: var(--vscode-descriptionForeground); font-size: 13px; font-family: var(--vscode-font-family); }
svg text.limit-label { fill: var(--vscode-charts-red, var(--vscode-editorError-foreground)); }
ul.errors { padding-left: 18px; }
ul.errors li { font-family: var(--vscode-editor-font-family); font-size: 0.92em; margin: 2px 0; }
pre.example { white-space: pre-wrap; word-break: break-word; font-family: var(--vscode-editor-font-family);
  font-size: var(--vscode-editor-font-size); background: var(--vscode-textCodeBlock-background); padding: 8px 10px;
  border-radius: 3px; margin: 0; line-height: 1.5; }
/* The padding keeps the outline off the text: at the text's own edge it hid underscores ("<|eot id|>"). */
mark.trained { background: var(--vscode-diffEditor-insertedTextBackground); color: inherit;
  outline: 1px solid var(--vscode-charts-green); border-radius: 2px; padding: 1px 1px 2px; }
/* high contrast: no inserted-text background there; the theme's border colour and an underline instead */
body.vscode-high-contrast mark.trained { background: transparent; outline: 1px dashed var(--vscode-contrastActiveBorder, var(--vscode-contrastBorder));
  text-decoration: underline; text-underline-offset: 3px; }
.legend mark { padding: 0 4px; }
/* read by screen readers, not drawn, and left out of a copied selection */
.visually-hidden { position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; border: 0; overflow: hidden;
  clip: rect(0 0 0 0); clip-path: inset(50%); white-space: nowrap; user-select: none; }
`;

/** The histogram as an inline SVG: one bar per bin, bins past maxLength in the warning colour, a dashed limit line. */
export function histogramSvg(h: LengthHistogram, maxLength: number): string {
  const W = 760, H = 200, left = 44, right = 12, top = 18, bottom = 34;
  const plotW = W - left - right, plotH = H - top - bottom;
  const bins = h.counts.length;
  const span = bins * h.binWidth;
  const x = (tokens: number) => left + (tokens / span) * plotW;
  const highest = Math.max(1, ...h.counts);
  const y = (count: number) => top + plotH - (count / highest) * plotH;
  const parts: string[] = [];
  h.counts.forEach((count, i) => {
    if (count === 0) return;
    const from = i * h.binWidth, to = from + h.binWidth;
    const over = from >= maxLength;
    const bx = x(from) + 0.5, bw = Math.max(1, x(to) - x(from) - 1);
    parts.push(
      `<rect class="bar${over ? ' over' : ''}" x="${bx.toFixed(1)}" y="${y(count).toFixed(1)}" width="${bw.toFixed(1)}" height="${(top + plotH - y(count)).toFixed(1)}">` +
        `<title>${int(from)}–${int(to - 1)} tokens: ${plural(count, 'example')}</title></rect>`,
    );
  });
  parts.push(`<line class="axis" x1="${left}" y1="${top + plotH}" x2="${W - right}" y2="${top + plotH}"/>`);
  parts.push(`<line class="axis" x1="${left}" y1="${top}" x2="${left}" y2="${top + plotH}"/>`);
  // x ticks: about six, on bin edges
  const tickEvery = Math.max(1, Math.ceil(bins / 6));
  for (let i = 0; i <= bins; i += tickEvery) {
    parts.push(`<text x="${x(i * h.binWidth).toFixed(1)}" y="${H - bottom + 14}" text-anchor="middle">${int(i * h.binWidth)}</text>`);
  }
  parts.push(`<text x="${left + plotW / 2}" y="${H - 4}" text-anchor="middle">tokens per example</text>`);
  parts.push(`<text x="${left - 6}" y="${top + 4}" text-anchor="end">${int(highest)}</text>`);
  parts.push(`<text x="${left - 6}" y="${top + plotH}" text-anchor="end">0</text>`);
  const lx = x(maxLength).toFixed(1);
  parts.push(`<line class="limit" x1="${lx}" y1="${top - 6}" x2="${lx}" y2="${top + plotH}"/>`);
  // near the right edge the label ends at the line, so it is not cut off
  const anchor = x(maxLength) > W - right - 60 ? 'end' : 'middle';
  parts.push(`<text class="limit-label" x="${lx}" y="${top - 8}" text-anchor="${anchor}">max length ${int(maxLength)}</text>`);
  return `<svg class="histogram" viewBox="0 0 ${W} ${H}" role="img" aria-label="Token lengths of the examples against the max length ${maxLength}">${parts.join('')}</svg>`;
}

function tokenSection(report: DatasetReport, o: PreviewOptions): string {
  const t = report.tokenization;
  if (!t) {
    return `<h2>Tokens</h2><p class="muted">Select a model (QLoRA: Select Model...) to see the examples as that model's tokenizer and chat template render them, their lengths and the part that is trained.</p>`;
  }
  const l = t.stats.lengths;
  const trainedShare = t.stats.totalTokens > 0 ? ` (${((100 * t.stats.trainedTokens) / t.stats.totalTokens).toFixed(1)}%)` : '';
  const rows = [
    ['model', escapeHtml(o.modelName ?? '')],
    ['chat template', escapeHtml(t.template ?? 'none (plain text)')],
    [
      t.sample ? `tokens per example (the first ${int(t.sample.tokenized)} of ${int(t.sample.of)})` : 'tokens per example',
      `min ${int(l.min)}, mean ${l.mean.toFixed(1)}, median ${int(l.p50)}, 95th percentile ${int(l.p95)}, max ${int(l.max)}`,
    ],
    [
      'over the max length',
      l.truncated > 0
        ? `<span class="warn">${plural(l.truncated, 'example')} of ${int(l.count)} longer than ${int(o.maxLength)} tokens, cut to it</span>`
        : `none of ${int(l.count)} (max length ${int(o.maxLength)})`,
    ],
    ['trained tokens', `${int(t.stats.trainedTokens)} of ${int(t.stats.totalTokens)}${trainedShare}`],
  ];
  if (t.stats.droppedNoTrainable > 0) {
    rows.push(['dropped', `<span class="warn">${plural(t.stats.droppedNoTrainable, 'example')} with nothing left to train after the cut</span>`]);
  }
  for (const w of t.warnings ?? []) rows.push(['warning', `<span class="warn">${escapeHtml(w)}</span>`]);
  const table = `<table class="stats">${rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join('')}</table>`;
  const histogram = l.count > 0 ? `<div class="histogram-scroll" tabindex="0" role="region" aria-label="Token length histogram">${histogramSvg(t.stats.histogram, o.maxLength)}</div>` : '';
  return `<h2>Tokens</h2>${table}${histogram}`;
}

/** A trained segment: highlighted, and said as such (a mark's highlight alone is not read out everywhere). */
export function trainedMark(text: string): string {
  return `<mark class="trained"><span class="visually-hidden">[trained] </span>${escapeHtml(text)}<span class="visually-hidden"> [end trained]</span></mark>`;
}

function examplesSection(report: DatasetReport): string {
  const examples = report.tokenization?.examples ?? [];
  if (examples.length === 0) return '';
  const items = examples.map((e) => {
    const body = e.segments.map((s) => (s.trained ? trainedMark(s.text) : escapeHtml(s.text))).join('');
    return `<h3>${escapeHtml(e.source)} · ${plural(e.tokens, 'token')}, ${int(e.trainedTokens)} trained</h3><pre class="example">${body}</pre>`;
  });
  return `<h2>First ${plural(examples.length, 'example')}</h2><p class="legend muted">As the model sees them; the <mark class="trained">marked</mark> part is what the loss trains on.</p>${items.join('')}`;
}

function problemsSection(report: DatasetReport): string {
  if (report.invalidRows === 0) return '';
  const more = report.invalidRows - report.errors.length;
  return (
    `<h2 class="warn">${plural(report.invalidRows, 'invalid row')}</h2>` +
    `<p class="muted">Also listed in the Problems panel at their lines. A run stops on them unless it skips invalid rows.</p>` +
    `<ul class="errors">${report.errors.map((e) => `<li>${escapeHtml(e)}</li>`).join('')}${more > 0 ? `<li class="muted">… and ${int(more)} more</li>` : ''}</ul>`
  );
}

export function buildDatasetPreviewHtml(report: DatasetReport, o: PreviewOptions): string {
  const summary = `${escapeHtml(report.format.toUpperCase())} · shape ${escapeHtml(report.shape ?? 'not recognised')} · ${plural(report.rowCount, 'row')} (${int(report.validRows)} valid, ${int(report.invalidRows)} invalid)`;
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${escapeHtml(previewContentSecurityPolicy(o.nonce))}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<style nonce="${escapeHtml(o.nonce)}">${STYLE}</style>
<title>${escapeHtml(report.file)}</title>
</head>
<body data-shape="${escapeHtml(report.shape ?? '')}" data-rows="${report.rowCount}" data-invalid="${report.invalidRows}">
<h1>${escapeHtml(report.file)}</h1>
<p class="muted">${summary}</p>
${problemsSection(report)}
${tokenSection(report, o)}
${examplesSection(report)}
</body>
</html>
`;
}
