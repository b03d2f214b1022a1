// The dataset preview's HTML from real inspect-data reports: policy, histogram against the max length, invalid
// rows, trained-part marking and escaping of the data's own text.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import { inspectDataset } from '../../extension/data';
import { buildDatasetPreviewHtml, histogramSvg, previewContentSecurityPolicy, trainedMark } from '../../extension/host/datasetPreview/html';
import { examplesDir, tinyModelDir, writeTemp } from '../fixtures/data/helpers';

const nonce = 'bm9uY2Utbm9uY2Utbm9uY2U=';

test('preview of a chat dataset with a model: stats, histogram with the max length, marked trained text', async () => {
  const report = await inspectDataset(path.join(examplesDir, 'chat-sample.jsonl'), { modelDir: tinyModelDir('llama'), maxLength: 64 });
  const html = buildDatasetPreviewHtml(report, { nonce, maxLength: 64, modelName: 'tiny' });
  assert.ok(html.includes(`content="default-src &#39;none&#39;; style-src &#39;nonce-${nonce}&#39;"`));
  assert.ok(!/<script/i.test(html), 'no script in the preview');
  assert.ok(!/ style="/.test(html), 'no inline style attributes (the policy would block them)');
  assert.match(html, /data-shape="messages" data-rows="60" data-invalid="0"/);
  const l = report.tokenization!.stats.lengths;
  assert.ok(html.includes(`${l.truncated} examples of 60 longer than 64 tokens, cut to it`));
  // one bar per non-empty bin; their tooltips add up to every example
  const bars = [...html.matchAll(/<rect class="bar( over)?"[^>]*><title>[\d,]+–[\d,]+ tokens: ([\d,]+) examples?<\/title>/g)];
  assert.equal(bars.reduce((a, m) => a + Number(m[2].replace(/,/g, '')), 0), 60);
  assert.ok(bars.some((m) => m[1] === ' over'), 'bins past the max length are marked');
  assert.match(html, /class="limit-label"[^>]*>max length 64</);
  // the first examples, trained parts marked
  assert.equal((html.match(/<pre class="example">/g) ?? []).length, 3);
  assert.ok((html.match(/<mark class="trained">/g) ?? []).length >= 3);
  // the trained part is said as well as highlighted; the histogram scrolls in a narrow editor rather than shrinking
  assert.ok(html.includes('<mark class="trained"><span class="visually-hidden">[trained] </span>'));
  assert.match(html, /<div class="histogram-scroll" tabindex="0" role="region" aria-label="Token length histogram"><svg class="histogram"/);
  assert.match(html, /svg\.histogram \{[^}]*min-width: 560px/);
  assert.ok(html.includes('<td>tokens per example</td>'));
  // a large dataset's statistics from its first examples say so
  const sampled = await inspectDataset(path.join(examplesDir, 'chat-sample.jsonl'), { modelDir: tinyModelDir('llama'), maxLength: 64, tokenizeAtMost: 20 });
  assert.ok(buildDatasetPreviewHtml(sampled, { nonce, maxLength: 64, modelName: 'tiny' }).includes('<td>tokens per example (the first 20 of 60)</td>'));
});

test('preview without a model; invalid rows listed; the data\'s text is escaped', async () => {
  const file = writeTemp('preview.jsonl', [
    JSON.stringify({ text: 'fine <b>bold</b> & "quoted"' }),
    JSON.stringify({ text: 42 }),
    '{not json',
  ].join('\n'));
  const report = await inspectDataset(file);
  const html = buildDatasetPreviewHtml(report, { nonce, maxLength: 512, modelName: null });
  assert.match(html, /2 invalid rows/);
  assert.match(html, /line 3/);
  assert.ok(html.includes('Select a model'));
  assert.ok(!html.includes('<b>bold</b>'));

  const withModel = await inspectDataset(file, { modelDir: tinyModelDir('llama') });
  const html2 = buildDatasetPreviewHtml(withModel, { nonce, maxLength: 512, modelName: 'tiny' });
  assert.ok(html2.includes('&#60;b&#62;bold&#60;/b&#62; &#38; &#34;quoted&#34;'), 'example text escaped');
});

test('histogram geometry: bar heights scale to the tallest bin; the limit line sits at the max length', () => {
  const svg = histogramSvg({ binWidth: 50, counts: [4, 2, 0, 1] }, 100);
  const heights = [...svg.matchAll(/<rect [^>]*height="([\d.]+)"/g)].map((m) => Number(m[1]));
  assert.equal(heights.length, 3, 'empty bins draw nothing');
  assert.ok(Math.abs(heights[1] / heights[0] - 0.5) < 1e-6 && Math.abs(heights[2] / heights[0] - 0.25) < 1e-6);
  // 4 bins span 200 tokens over the plot (x from 44 to 748): 100 tokens is the middle
  const lx = Number(/<line class="limit" x1="([\d.]+)"/.exec(svg)![1]);
  assert.ok(Math.abs(lx - (44 + 704 / 2)) < 0.1);
  assert.equal(previewContentSecurityPolicy('n'), "default-src 'none'; style-src 'nonce-n'");
});

test('high contrast themes: every histogram and marking colour falls back to one they define', () => {
  const html = buildDatasetPreviewHtml(
    { file: 'd.jsonl', format: 'jsonl', shape: null, rowCount: 0, validRows: 0, invalidRows: 0, errors: [] },
    { nonce, maxLength: 64, modelName: null },
  );
  assert.match(html, /svg \.bar\.over \{ fill: var\(--vscode-charts-orange, var\(--vscode-editorWarning-foreground/);
  assert.match(html, /fill: rgb\(from var\(--vscode-charts-orange, [^;]*\) r g b \/ 1\)/, 'a translucent theme orange drawn opaque');
  assert.match(html, /body\.vscode-high-contrast svg \.bar \{ stroke: var\(--vscode-contrastBorder\)/);
  assert.match(html, /body\.vscode-high-contrast mark\.trained \{[^}]*outline: 1px dashed var\(--vscode-contrastActiveBorder, var\(--vscode-contrastBorder\)\)/);
  assert.equal(trainedMark('a<b'), '<mark class="trained"><span class="visually-hidden">[trained] </span>a&#60;b<span class="visually-hidden"> [end trained]</span></mark>');
});
