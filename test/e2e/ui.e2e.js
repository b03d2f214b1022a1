// UI test of QLoRA Studio in code-server, driven by playwright-core as a user would: command palette, QuickPicks
// typed into, the side panel's webview (charts drawn from the trainer's real events), its Stop/Resume buttons, and
// screenshots in the dark and light themes (test/e2e/artifacts/).
// Usage: node ui.e2e.js <code-server URL> <workspace> <artifacts dir> <user-data-dir>
// The server must run WITHOUT enable-smoke-test-driver (that flag hides notifications).
// Env: E2E_CS_LOG (code-server log, dumped on failure).
const fs = require('fs');
const path = require('path');
const { launch, serverDump } = require('./browser');

const [base, folder, outDir, userDataDir] = process.argv.slice(2);
const t0 = Date.now();
const lap = m => console.log(`[ui ${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
const sleep = ms => new Promise(r => setTimeout(r, ms));
const results = [];
let page;

const runsDir = () => path.join(folder, '.qlora', 'runs');
function latestRun() {
  if (!fs.existsSync(runsDir())) return undefined;
  const dirs = fs.readdirSync(runsDir()).map(n => path.join(runsDir(), n)).filter(d => fs.statSync(d).isDirectory());
  dirs.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
  return dirs[0];
}
function events(runDir) {
  const f = runDir && path.join(runDir, 'events.jsonl');
  if (!f || !fs.existsSync(f)) return [];
  return fs.readFileSync(f, 'utf8').split('\n').filter(Boolean).map(l => { try { return JSON.parse(l); } catch { return null; } }).filter(Boolean);
}
function eventsTail(runDir, n = 6) {
  const f = runDir && path.join(runDir, 'events.jsonl');
  return f && fs.existsSync(f) ? fs.readFileSync(f, 'utf8').trim().split('\n').slice(-n).map(l => l.slice(0, 240)).join('\n') : '(no run folder yet)';
}

async function dump(what) {
  const lines = [`--- state while waiting for ${what} ---`];
  try { lines.push(`page text: ${(await page.locator('.monaco-workbench').innerText({ timeout: 2000 })).replace(/\s+/g, ' ').slice(0, 1500)}`); } catch (e) { lines.push(`page text: (${e.message.split('\n')[0]})`); }
  const wv = await trainingFrame().catch(() => null);
  if (wv) lines.push(`training webview body: ${JSON.stringify(await wv.evaluate(() => ({ attrs: Object.fromEntries([...document.body.attributes].map(a => [a.name, a.value])), text: document.body.innerText.slice(0, 800) })).catch(e => e.message))}`);
  lines.push(`events.jsonl tail (${latestRun()}):\n${eventsTail(latestRun())}`);
  lines.push(serverDump(userDataDir));
  return lines.join('\n');
}

/** Polls fn until truthy; on timeout throws with the page text, the run's events and the server logs. */
async function waitFor(what, fn, timeout = 30000, interval = 250) {
  const end = Date.now() + timeout;
  let lastErr;
  while (Date.now() < end) {
    try { const v = await fn(); if (v) return v; } catch (e) { lastErr = e; }
    await sleep(interval);
  }
  throw new Error(`timed out after ${timeout / 1000}s waiting for ${what}${lastErr ? ` (last error: ${lastErr.message.split('\n')[0]})` : ''}\n${await dump(what)}`);
}

async function step(name, fn) {
  const s = Date.now();
  try {
    await fn();
    results.push([name, true]);
    lap(`ok   ${name} (${((Date.now() - s) / 1000).toFixed(1)}s)`);
    return true;
  } catch (e) {
    results.push([name, false]);
    lap(`FAIL ${name}: ${e.message}`);
    await page.screenshot({ path: path.join(outDir, `failure-${results.length}.png`) }).catch(() => {});
    return false;
  }
}

const shot = async name => { const p = path.join(outDir, name); await page.screenshot({ path: p }); lap(`screenshot ${p}`); };
const quickInput = () => page.locator('.quick-input-widget');

/** F1, type the command's title, pick its row. The palette lists a command only once the extension host registered
 * it: retry. The row is clicked by its exact label (Enter would take the top fuzzy match). */
async function runCommand(title) {
  await waitFor(`"${title}" in the command palette`, async () => {
    await page.keyboard.press('F1');
    const input = page.locator('.quick-input-widget input');
    await input.waitFor({ state: 'visible', timeout: 10000 });
    await input.fill('>' + title);
    const rows = page.locator('.quick-input-list .monaco-list-row');
    const end = Date.now() + 2500;
    while (Date.now() < end) {
      const labels = await rows.locator('.label-name').allInnerTexts().catch(() => []);
      const i = labels.findIndex(l => l.replace(/\s+/g, ' ').trim() === title);
      if (i >= 0) { await rows.nth(i).click(); return true; }
      await sleep(200);
    }
    await page.keyboard.press('Escape');
    return false;
  }, 60000, 500);
}

/** The frame of the Training view's webview: the inner frame that has the loss chart. */
async function trainingFrame() {
  for (const f of page.frames()) {
    if (await f.evaluate(() => !!document.getElementById('loss-chart')).catch(() => false)) return f;
  }
  return undefined;
}

/** How many pixels of a canvas are painted (alpha > 0), read inside the webview. */
const paintedPixels = (frame, id) => frame.evaluate(id => {
  const c = document.getElementById(id);
  if (!c || !c.getContext || !c.width || !c.height) return -1;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}, id);
const bodyData = frame => frame.evaluate(() => ({ ...document.body.dataset }));

/** Clicks a panel button: [data-action=<action>] when the panel marks its buttons so, else by its accessible name. */
async function clickAction(action) {
  const frame = await waitFor('the Training webview', trainingFrame, 15000);
  const marked = frame.locator(`[data-action="${action}"]`);
  if (await marked.count()) return marked.first().click();
  return frame.getByRole('button', { name: new RegExp(`^\\s*${action}`, 'i') }).first().click({ timeout: 10000 });
}

/** Screenshots the lead can read: collapse the Runs view under Training and widen the side bar (drag its sash). */
async function roomForTheCharts() {
  const runsHeader = page.locator('.part.sidebar .pane-header', { hasText: /^\s*Runs/ }).first();
  if (await runsHeader.count() && (await runsHeader.getAttribute('aria-expanded')) === 'true') await runsHeader.click();
  const box = await page.locator('.part.sidebar').boundingBox();
  if (box && box.width < 500) {
    const x = box.x + box.width + 1, y = box.y + box.height / 2;
    await page.mouse.move(x, y);
    await page.mouse.down();
    await page.mouse.move(x + 300, y, { steps: 10 });
    await page.mouse.up();
  }
  await sleep(500);
}

/** Preferences: Color Theme, pick the theme by its label ("Light Modern" is the setting's "Default Light Modern"). */
async function setTheme(label, cls) {
  await runCommand('Preferences: Color Theme');
  await page.locator('.quick-input-widget input').fill(label);
  const rows = page.locator('.quick-input-list .monaco-list-row');
  const i = await waitFor(`"${label}" in the theme picker`, async () => {
    const labels = await rows.locator('.label-name').allInnerTexts();
    const k = labels.findIndex(l => l.trim() === label);
    return k >= 0 ? k + 1 : false;
  }, 15000);
  await rows.nth(i - 1).click();
  await waitFor(`the ${label} theme`, () => page.evaluate(c => document.querySelector('.monaco-workbench').classList.contains(c), cls), 20000);
  await sleep(1500); // webviews restyle from the new theme variables and charts redraw
}

(async () => {
  fs.mkdirSync(outDir, { recursive: true });
  const browser = await launch({ width: 1600, height: 1000 });
  page = browser.page;
  page.on('pageerror', e => console.log('pageerror:', e.message));
  let runDir;
  try {
    const loaded = await step('workbench loads on the workspace', async () => {
      await page.goto(`${base}/?folder=${encodeURIComponent(folder)}`);
      await page.waitForSelector('.monaco-workbench', { timeout: 60000 });
      await page.waitForSelector('.statusbar', { timeout: 60000 });
    });
    if (!loaded) throw new Error('no workbench');

    await step('QLoRA: Show Engine Info shows a notification', async () => {
      await runCommand('QLoRA: Show Engine Info');
      await waitFor('the engine info notification', () => page.locator('.notifications-toasts', { hasText: 'QLoRA engine' }).isVisible(), 30000);
      await shot('engine-info.png');
      await page.keyboard.press('Escape');
    });

    const started = await step('QLoRA: New Finetune... through the QuickPicks starts a run', async () => {
      const before = latestRun();
      await runCommand('QLoRA: New Finetune...');
      // Answer each QuickPick/InputBox the flow shows, as a user: type to filter, Enter.
      const answers = [[/model/i, 'tiny'], [/dataset/i, 'chat-long'], [/preset/i, 'quick']];
      const dialog = page.locator('.monaco-dialog-box');
      for (let n = 1; n <= 8; n++) {
        const next = await waitFor('the next QuickPick or dialog (or the end of the flow)', async () => {
          if (await dialog.isVisible()) return 'dialog';
          if (await quickInput().isVisible()) return 'pick';
          const r = latestRun();
          return r && r !== before && events(r).length ? 'done' : false;
        }, 30000);
        if (next === 'done') break;
        await sleep(300); // the items arrive asynchronously
        if (next === 'dialog') {
          // the confirmation: a modal dialog summing up the run; a user clicks its primary button
          lap(`  dialog ${n}: ${(await dialog.innerText()).replace(/\s+/g, ' ').slice(0, 400)}`);
          await shot(`new-finetune-${n}.png`);
          await dialog.getByRole('button', { name: /start/i }).first().click();
          await waitFor('the dialog to close', async () => !(await dialog.isVisible()), 15000);
          continue;
        }
        const title = (await page.locator('.quick-input-widget .quick-input-title').innerText().catch(() => '')).trim();
        const placeholder = await page.locator('.quick-input-widget input').getAttribute('placeholder').catch(() => '');
        const value = await page.locator('.quick-input-widget input').inputValue().catch(() => '');
        const items = (await page.locator('.quick-input-list .monaco-list-row').allInnerTexts().catch(() => [])).map(s => s.replace(/\s+/g, ' ').trim());
        lap(`  quick input ${n}: "${title}" (${placeholder}) value "${value}" items: ${JSON.stringify(items.slice(0, 6))}`);
        await shot(`new-finetune-${n}.png`);
        const answer = answers.find(([re]) => re.test(title) || re.test(placeholder || ''));
        if (answer) {
          await page.locator('.quick-input-widget input').fill(answer[1]);
          await waitFor(`a row matching "${answer[1]}"`, () => page.locator('.quick-input-list .monaco-list-row', { hasText: answer[1] }).first().isVisible(), 15000);
        }
        await page.keyboard.press('Enter'); // an InputBox (run name): accept the proposed value
        // The dataset preview opening beside the flow can take the keyboard focus from the input just as Enter is
        // pressed (the input stays up: ignoreFocusOut); a user would click into it and press Enter again.
        let pressedAt = Date.now();
        await waitFor('the QuickPick to move on', async () => {
          const moved = !(await quickInput().isVisible()) ||
            (await page.locator('.quick-input-widget .quick-input-title').innerText().catch(() => '')).trim() !== title;
          if (!moved && Date.now() - pressedAt > 3000) {
            lap(`  "${title}" still open: focusing it and pressing Enter again`);
            await page.locator('.quick-input-widget input').click().catch(() => {});
            await page.keyboard.press('Enter');
            pressedAt = Date.now();
          }
          return moved;
        }, 20000);
      }
      runDir = await waitFor('a new run folder with events', () => { const r = latestRun(); return r && r !== before && events(r).length && r; }, 60000);
      lap(`  run folder ${runDir}`);
    });

    started && await step('New Finetune previewed the dataset: histogram against the max length, trained text marked', async () => {
      // the preview is a script-less webview; its document is one of the page's frames. The run just started trains
      // on the same two cores meanwhile: CI once saw the preview's frame take more than 30 s to render
      const frame = await waitFor('the dataset preview (svg.histogram)', async () => {
        for (const f of page.frames()) {
          if (await f.evaluate(() => !!document.querySelector('svg.histogram')).catch(() => false)) return f;
        }
        return undefined;
      }, 60000);
      const d = await frame.evaluate(() => ({
        shape: document.body.dataset.shape, rows: document.body.dataset.rows,
        bars: document.querySelectorAll('svg.histogram rect.bar').length,
        limit: document.querySelector('svg .limit-label')?.textContent,
        examples: document.querySelectorAll('pre.example').length, marked: document.querySelectorAll('mark.trained').length,
      }));
      lap(`  preview: ${JSON.stringify(d)}`);
      if (d.shape !== 'messages' || d.bars < 1 || d.limit !== 'max length 128' || d.examples < 1 || d.marked < 1) throw new Error(`dataset preview incomplete: ${JSON.stringify(d)}`);
      await shot('dataset-preview.png');
    });

    const panel = started && await step('the Training view shows the loss chart from real events', async () => {
      // the activity bar's "QLoRA Studio" container (the extension may have revealed it already)
      const sideTitle = () => page.locator('.part.sidebar .composite.title').innerText().catch(() => '');
      if (!/QLoRA Studio/i.test(await sideTitle())) {
        const labels = await page.locator('.activitybar .action-item [aria-label], .activitybar .action-item[aria-label]').evaluateAll(els => els.map(e => e.getAttribute('aria-label')));
        lap(`  activity bar: ${JSON.stringify(labels)}`);
        await page.locator('.activitybar .action-item').filter({ has: page.locator('[aria-label^="QLoRA Studio"]') }).first().click({ timeout: 10000 });
        await waitFor('the QLoRA Studio side bar', async () => /QLoRA Studio/i.test(await sideTitle()), 10000);
      }
      const frame = await waitFor('the Training webview (#loss-chart)', trainingFrame, 30000);
      await roomForTheCharts();
      await waitFor('data-run-status=running and data-steps >= 5', async () => {
        const d = await bodyData(frame);
        return d.runStatus === 'running' && Number(d.steps) >= 5;
      }, 60000);
      const d = await bodyData(frame);
      const onDisk = events(runDir).filter(e => e.kind === 'step').length;
      lap(`  webview data: ${JSON.stringify(d)}; steps in events.jsonl: ${onDisk}`);
      if (!(Number(d.steps) > 0 && Number(d.steps) <= onDisk)) throw new Error(`data-steps ${d.steps} does not match the ${onDisk} steps in events.jsonl`);
      const lossPx = await waitFor('painted pixels in #loss-chart', async () => { const n = await paintedPixels(frame, 'loss-chart'); return n > 200 && n; }, 20000);
      const memPx = await paintedPixels(frame, 'memory-chart');
      const pages = await frame.evaluate(() => !!document.getElementById('pages-chart'));
      lap(`  painted pixels: loss ${lossPx}, memory ${memPx}; pages-chart present: ${pages}`);
      if (memPx <= 0) throw new Error(`memory-chart has nothing drawn (${memPx})`);
      if (!pages) throw new Error('no #pages-chart (page events area)');
      await shot('training-dark-running.png');
    });

    if (panel) await step('Stop and Resume buttons in the webview', async () => {
      await clickAction('stop');
      await waitFor('data-run-status=stopped', async () => (await bodyData(await trainingFrame())).runStatus === 'stopped', 60000);
      await waitFor('a stopped finished event', () => events(runDir).some(e => e.kind === 'finished' && e.status === 'stopped'), 15000);
      await shot('training-dark-stopped.png');
      await clickAction('resume');
      await waitFor('data-run-status=running after Resume', async () => (await bodyData(await trainingFrame())).runStatus === 'running', 60000);
      await waitFor('data-run-status=finished', async () => (await bodyData(await trainingFrame())).runStatus === 'finished', 600000, 1000);
      if (!events(runDir).some(e => e.kind === 'finished' && e.status === 'completed')) throw new Error('no completed finished event');
    });

    // Export and merge from the panel's buttons, answering the dialogs as a user: the save dialog (code-server's
    // simple file dialog, a QuickInput holding the proposed path) is accepted with Enter; the merge asks for a dtype.
    if (panel) await step('Export Adapter and Merge and Save buttons write their folders', async () => {
      const acceptSaveDialog = async (what) => {
        await waitFor(`the ${what} save dialog`, () => quickInput().isVisible(), 20000);
        await sleep(300);
        const proposed = await page.locator('.quick-input-widget input').inputValue();
        lap(`  ${what} dialog proposes ${proposed}`);
        await page.keyboard.press('Enter');
        return proposed;
      };
      await clickAction('export');
      const exported = await acceptSaveDialog('export');
      const adapterDir = path.join(folder, `${path.basename(runDir)}-adapter`); // proposed in the workspace folder
      await waitFor(`the exported adapter in ${adapterDir}`, () => fs.existsSync(path.join(adapterDir, 'adapter_config.json')) && fs.existsSync(path.join(adapterDir, 'adapter_model.safetensors')), 60000);
      await waitFor('the export notification', () => page.locator('.notifications-toasts', { hasText: 'Exported' }).first().isVisible(), 20000);
      await shot('export-done.png');
      if (!exported.includes(path.basename(adapterDir))) throw new Error(`the export dialog proposed ${exported}`);

      await clickAction('merge');
      await waitFor('the merge precision QuickPick', async () => /Precision/i.test(await page.locator('.quick-input-widget .quick-input-title').innerText().catch(() => '')), 20000);
      await page.locator('.quick-input-widget input').fill('f32');
      await sleep(300);
      await page.keyboard.press('Enter');
      await waitFor('the precision QuickPick to close', async () => !/Precision/i.test(await page.locator('.quick-input-widget .quick-input-title').innerText().catch(() => '')), 10000);
      await acceptSaveDialog('merge');
      const mergedDir = path.join(runDir, 'merged');
      await waitFor(`the merged model in ${mergedDir}`, () => fs.existsSync(path.join(mergedDir, 'config.json')) && fs.readdirSync(mergedDir).some(f => f.endsWith('.safetensors')), 120000);
      await waitFor('the merge notification', () => page.locator('.notifications-toasts', { hasText: 'Merged' }).first().isVisible(), 20000);
      await shot('merge-done.png');
      await page.keyboard.press('Escape');
    });

    // qlora.samplePrompts (the workspace's settings) made the run answer two prompts at the start and at each eval
    if (panel) await step('the Training view shows the sample answers step by step', async () => {
      const onDisk = events(runDir).filter(e => e.kind === 'sample').length;
      if (onDisk < 4) throw new Error(`only ${onDisk} sample events in events.jsonl`);
      const frame = await waitFor('the Training webview', trainingFrame, 15000);
      await waitFor(`data-samples=${onDisk}`, async () => Number((await bodyData(frame)).samples) === onDisk, 20000);
      const d = await frame.evaluate(() => ({
        prompts: [...document.querySelectorAll('.sample-prompt')].map(e => e.textContent),
        steps: [...document.querySelectorAll('.sample-thread')].map(t => [...t.querySelectorAll('.sample-step')].map(e => e.textContent)),
      }));
      lap(`  samples: ${JSON.stringify(d)}`);
      if (d.prompts.length !== 2 || !d.steps.every(s => s.length >= 2 && s[s.length - 1].startsWith('step 0'))) throw new Error(`sample threads incomplete: ${JSON.stringify(d)}`);
      await frame.evaluate(() => document.getElementById('samples').scrollIntoView());
      await sleep(300);
      await shot('training-samples.png');
    });

    if (panel) await step('after a window reload, the samples are read back from events.jsonl', async () => {
      const onDisk = events(runDir).filter(e => e.kind === 'sample').length;
      await runCommand('Developer: Reload Window');
      await page.waitForSelector('.monaco-workbench', { timeout: 60000 });
      await sleep(2000);
      const frame = await waitFor('the Training webview after the reload', async () => {
        const f = await trainingFrame();
        if (f) return f;
        await page.locator('.activitybar .action-item').filter({ has: page.locator('[aria-label^="QLoRA Studio"]') }).first().click({ timeout: 5000 }).catch(() => {});
        return undefined;
      }, 60000, 1000);
      await waitFor(`data-samples=${onDisk} after the reload`, async () => Number((await bodyData(frame)).samples) === onDisk, 30000);
    });

    const chatFrame = async () => {
      for (const f of page.frames()) if (await f.evaluate(() => !!document.getElementById('chat-title')).catch(() => false)) return f;
      return undefined;
    };
    const chatServers = () => require('child_process').execFileSync('ps', ['-eo', 'pid,args'], { encoding: 'utf8' }).split('\n').filter(l => /cli\.js chat-server/.test(l));

    if (panel) await step('Try Model: the base and the finetuned column answer a prompt, streaming; closing the panel frees the model', async () => {
      await clickAction('try');
      const frame = await waitFor('the chat webview', chatFrame, 30000);
      await waitFor('the model loaded (data-chat-state=ready)', async () => (await bodyData(frame)).chatState === 'ready', 60000);
      if (chatServers().length !== 1) throw new Error(`expected one chat server process: ${chatServers().join(' | ')}`);
      const loaded = await frame.evaluate(() => window.qloraChat);
      lap(`  chat: ${JSON.stringify(loaded)}`);
      if (loaded.columns.join() !== 'base,finetuned') throw new Error(`columns: ${loaded.columns}`);
      // long enough answers to watch them grow: the untrained base never ends its turn
      await frame.evaluate(() => { document.getElementById('max-new-tokens').value = '400'; document.getElementById('temperature').value = '0'; });
      const prompt = frame.locator('#prompt');
      await prompt.click();
      await page.keyboard.type('What is the capital of France?');
      await page.keyboard.press('Enter');
      const lengths = new Set();
      await waitFor('both answers finished (data-answered=1)', async () => {
        const c = await frame.evaluate(() => window.qloraChat);
        if (c.busy) lengths.add(`${c.answers.base[0]?.length ?? 0}/${c.answers.finetuned[0]?.length ?? 0}`);
        return (await bodyData(frame)).answered === '1';
      }, 120000, 60);
      const c = await frame.evaluate(() => window.qloraChat);
      lap(`  answers: ${JSON.stringify(c.answers).slice(0, 400)}; finished ${JSON.stringify(c.finished)}; partial lengths seen ${[...lengths].join(' ')}`);
      if (!c.answers.base[0] || !c.answers.finetuned[0]) throw new Error('a column has no answer');
      if (lengths.size < 2) throw new Error(`the answers did not stream (partial lengths seen: ${[...lengths].join(' ')})`);
      if (c.finished.finetuned[0] !== 'stop-token') throw new Error(`the finetuned answer did not end its turn: ${c.finished.finetuned[0]}`);
      // Copy: the button says what the host made of it (the headless browser may refuse the clipboard: Not copied)
      await frame.locator('[data-copy="finetuned:0"]').click();
      const copied = await waitFor('the Copy button to say what became of the copy', async () => {
        const text = (await frame.locator('[data-copy="finetuned:0"]').textContent())?.trim();
        return text === 'Copied' || text === 'Not copied' ? text : null;
      }, 10000);
      lap(`  Copy: ${copied}`);
      await shot('chat-dark.png');
      await setTheme('Light Modern', 'vs');
      await shot('chat-light.png');
      await setTheme('Dark Modern', 'vs-dark');
      await runCommand('View: Close Editor');
      await waitFor('the chat webview to go', async () => !(await chatFrame()), 15000);
      await waitFor('the chat server to exit', () => chatServers().length === 0, 20000);
    });

    await step('screenshots in the dark and light themes', async () => {
      // the top of the Training view (loss, lr, grad norm), then scrolled to the memory chart and page events
      const both = async theme => {
        const frame = await trainingFrame();
        if (frame) await frame.evaluate(() => window.scrollTo(0, 0));
        await shot(`training-${theme}.png`);
        if (frame && await frame.evaluate(() => { const c = document.getElementById('memory-chart'); if (c) c.scrollIntoView(); return !!c; })) {
          await sleep(300);
          await shot(`training-${theme}-memory.png`);
        }
      };
      await setTheme('Dark Modern', 'vs-dark');
      await both('dark');
      await setTheme('Light Modern', 'vs');
      await both('light');
      await setTheme('Dark Modern', 'vs-dark');
    });
  } catch (e) {
    lap(`aborted: ${e.message}`);
    results.push(['(aborted)', false]);
  } finally {
    await browser.close();
  }
  const passed = results.filter(r => r[1]).length, failed = results.length - passed;
  console.log(`UI suite: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})();
