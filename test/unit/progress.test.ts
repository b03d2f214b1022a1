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
  assert.equal(shellLine(['C:\\runs\\r 1']), "'C:\\runs\\r 1'");
});
