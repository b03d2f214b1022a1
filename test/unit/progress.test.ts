// The terminal's progress lines: a stopped run says how to resume it, with its own folder as a shell word.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TerminalProgress } from '../../extension/trainer/progress';
import { shellLine } from '../../extension/util/shellLine';
import { ev } from './hostFakes';

function linesFor(runDir: string): string[] {
  const written: string[] = [];
  const out = { write: (text: string) => written.push(text) } as unknown as NodeJS.WriteStream;
  const progress = new TerminalProgress(out, false);
  progress.handle(ev.started(runDir, 10));
  progress.handle({ ...ev.finished('stopped', 4), adapterPath: `${runDir}/adapter` } as never);
  return written.join('').split('\n');
}

test('a stop prints the resume command for this run, quoted for a shell where the path needs it', () => {
  assert.ok(linesFor('/runs/r1').some((l) => l.includes('stopped at step 4; resume with "qlora-studio resume --run /runs/r1"')));
  assert.ok(linesFor("/runs/it's mine").some((l) => l.includes(`resume --run '/runs/it'\\''s mine'`)));
  assert.equal(shellLine(['/a/b-c_d.e']), '/a/b-c_d.e');
  assert.equal(shellLine(['C:\\runs\\r 1'], 'linux'), "'C:\\runs\\r 1'");
  // Windows: PowerShell and cmd read double quotes, and backslashes are a path's
  assert.equal(shellLine(['qlora-studio', 'resume', '--run', 'C:\\runs\\r1'], 'win32'), 'qlora-studio resume --run C:\\runs\\r1');
  assert.equal(shellLine(['C:\\Users\\Jo Doe\\it\'s'], 'win32'), '"C:\\Users\\Jo Doe\\it\'s"');
});

test('before the run: the tokenizing count in place on a terminal, a line a stage elsewhere', () => {
  const run = (tty: boolean) => {
    const written: string[] = [];
    const progress = new TerminalProgress({ write: (text: string) => written.push(text) } as unknown as NodeJS.WriteStream, tty);
    for (const done of [0, 5000, 20000]) progress.preparing({ kind: 'preparing', stage: 'data', done, total: 20000 });
    progress.preparing({ kind: 'preparing', stage: 'model', done: null, total: null });
    progress.handle(ev.started('/runs/r1', 10));
    return written.join('');
  };
  assert.equal(run(false).split('\n').slice(0, 2).join('\n'), 'tokenizing the data: 20,000 examples...\nloading the model...');
  const tty = run(true);
  assert.ok(tty.includes('\r\x1b[2Ktokenizing the data: 5,000 of 20,000 examples\r\x1b[2Ktokenizing the data: 20,000 of 20,000 examples'), JSON.stringify(tty));
  assert.ok(tty.includes('loading the model...\r\x1b[2Ktraining: '), 'the run-started line replaces it');
  // a run that fails while preparing: the line drawn in place is ended before the error sentence
  const written: string[] = [];
  const progress = new TerminalProgress({ write: (text: string) => written.push(text) } as unknown as NodeJS.WriteStream, true);
  progress.preparing({ kind: 'preparing', stage: 'data', done: 30, total: 30 });
  progress.close();
  progress.close();
  assert.equal(written.join(''), '\r\x1b[2Ktokenizing the data: 30 of 30 examples\n');
});
