// Test doubles for the host's pure modules: a fake forked child process and event builders.
import { EventEmitter } from 'node:events';
import { PassThrough } from 'node:stream';
import type { ChildProcess } from 'node:child_process';
import type { ForkFunction } from '../../extension/host/trainerProcess';
import type { TrainerEvent } from '../../extension/protocol/events';

export class FakeChild extends EventEmitter {
  readonly stdout = new PassThrough();
  readonly stderr = new PassThrough();
  pid: number | undefined = 4242;
  connected = true;
  readonly sent: unknown[] = [];
  readonly signals: string[] = [];

  send(message: unknown): boolean {
    this.sent.push(message);
    return true;
  }

  /** The IPC channel closed from this side (the host letting a trainer go on alone). */
  disconnected = false;

  disconnect(): void {
    this.disconnected = true;
    this.connected = false;
  }

  kill(signal: string = 'SIGTERM'): boolean {
    this.signals.push(signal);
    return true;
  }

  /** Ends like a real child: streams end, then 'close' on a later tick (after pending stream data). */
  exit(code: number | null, signal: string | null = null): void {
    this.connected = false;
    this.stdout.end();
    this.stderr.end();
    setImmediate(() => this.emit('close', code, signal));
  }
}

export function fakeFork(): { fork: ForkFunction; children: FakeChild[]; calls: { modulePath: string; args: readonly string[]; options: unknown }[] } {
  const children: FakeChild[] = [];
  const calls: { modulePath: string; args: readonly string[]; options: unknown }[] = [];
  const fork: ForkFunction = (modulePath, args, options) => {
    calls.push({ modulePath, args, options });
    const child = new FakeChild();
    children.push(child);
    return child as unknown as ChildProcess;
  };
  return { fork, children, calls };
}

export function memoryOutput(): { appendLine(line: string): void; lines: string[] } {
  const lines: string[] = [];
  return { lines, appendLine: (line) => void lines.push(line) };
}

const time = '2026-11-24T10:00:00.000Z';

export const ev = {
  started: (runDir: string, totalSteps = 10, resumedFrom: number | null = null): TrainerEvent => ({
    kind: 'run-started', time, protocol: 1, runDir, config: {}, totalSteps, resumedFrom, trainableParameters: 10, memoryEstimate: null,
    dataset: { file: 'd.jsonl', format: 'jsonl', shape: 'messages', template: 'model', trainExamples: 9, evalExamples: 1, trainTokens: 90, trainedTokens: 40, truncated: 0, skippedInvalid: 0, droppedEmpty: 0, packed: false },
  }),
  step: (step: number, loss: number, totalSteps = 10, t = time): TrainerEvent => ({
    kind: 'step', time: t, step, totalSteps, epoch: step / totalSteps, loss, lr: 1e-4, gradNorm: 0.5, tokensPerSecond: 850.4, elapsedSeconds: step, etaSeconds: totalSteps - step,
  }),
  checkpoint: (step: number): TrainerEvent => ({ kind: 'checkpoint', time, step, path: `/r/checkpoints/step-${step}` }),
  error: (message: string): TrainerEvent => ({ kind: 'error', time, message, step: 3, lastCheckpoint: null }),
  finished: (status: 'completed' | 'stopped' | 'failed', step: number, finalLoss: number | null = 1.5): TrainerEvent => ({
    kind: 'finished', time, status, step, adapterPath: status === 'failed' ? null : '/r/adapter', finalLoss, elapsedSeconds: 12,
  }),
};

export const tick = () => new Promise<void>((resolve) => setImmediate(resolve));
