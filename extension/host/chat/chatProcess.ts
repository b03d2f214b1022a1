// The chat server process as the extension host sees it: `cli.js chat-server` forked with an IPC channel, requests
// with ids, answers streamed back. Every message from it is validated. If it dies, everything waiting on it fails
// with one sentence (its last error line when it wrote one) and the host carries on. No vscode import.
import type { ChildProcess } from 'node:child_process';
import { fork } from 'node:child_process';
import type { ChatMessage } from '../../data/shapes';
import {
  validateServerToHost,
  type AnswerStats,
  type ChatColumnId,
  type ChatModelInfo,
  type ChatSettings,
  type ChatSource,
  type HostToServer,
} from '../../protocol/chat';
import { failureFromStderr, forkCli, LineSplitter, type ForkFunction, type OutputSink, type TrainerLaunch } from '../trainerProcess';

export interface ChatAnswer {
  text: string;
  stats: AnswerStats;
}

interface Pending {
  onDelta: (text: string) => void;
  resolve: (answer: ChatAnswer) => void;
  reject: (err: Error) => void;
}

export class ChatProcessError extends Error {
  override readonly name = 'ChatProcessError';
}

export class ChatProcess {
  private readonly child: ChildProcess;
  private readonly pending = new Map<number, Pending>();
  private loadWaiter: { resolve: (info: ChatModelInfo) => void; reject: (err: Error) => void } | null = null;
  private nextId = 1;
  private readonly stderr: string[] = [];
  private exitReason: string | null = null;
  /** Resolves when the process has exited. */
  readonly exited: Promise<void>;

  /** args: the chat-server verb's options (--device, --cuda-lib-dir). */
  constructor(launch: TrainerLaunch, private readonly output: OutputSink, forkFn: ForkFunction = fork, args: string[] = []) {
    this.child = forkCli(forkFn, launch, ['chat-server', ...args]);
    const err = new LineSplitter((line) => {
      this.output.appendLine(`[chat] ${line}`);
      this.stderr.push(line);
      if (this.stderr.length > 20) this.stderr.shift();
    });
    this.child.stderr?.setEncoding('utf8').on('data', (chunk: string) => err.push(chunk));
    this.child.stdout?.setEncoding('utf8').on('data', (chunk: string) => this.output.appendLine(`[chat] ${chunk.trimEnd()}`));
    this.child.on('message', (raw: unknown) => this.receive(raw));
    this.exited = new Promise((resolve) => {
      this.child.once('error', (e) => this.fail(`the chat process could not start (${e.message})`));
      this.child.once('exit', (code, signal) => {
        err.flush();
        this.fail(failureFromStderr(this.stderr) ?? (signal ? `the chat process was killed (${signal})` : `the chat process exited with code ${code}`));
        resolve();
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Loads (or replaces) the model; resolves with what the server reports of it. */
  load(source: ChatSource): Promise<ChatModelInfo> {
    this.loadWaiter?.reject(new ChatProcessError('replaced by another load'));
    return new Promise((resolve, reject) => {
      this.loadWaiter = { resolve, reject };
      this.post({ type: 'load', source });
    });
  }

  /** Starts an answer; `done` resolves when it is complete (or cancelled), rejects on an error. */
  generate(column: ChatColumnId, messages: ChatMessage[], settings: ChatSettings, onDelta: (text: string) => void): { id: number; done: Promise<ChatAnswer> } {
    const id = this.nextId++;
    const done = new Promise<ChatAnswer>((resolve, reject) => {
      this.pending.set(id, { onDelta, resolve, reject });
    });
    this.post({ type: 'generate', id, column, messages, settings });
    return { id, done };
  }

  cancel(id: number): void {
    this.post({ type: 'cancel', id });
  }

  /** Drops the conversation caches (after Clear). */
  reset(): void {
    this.post({ type: 'reset' });
  }

  /** Ends the process: the IPC channel closes, the server frees the model and exits; killed if it lingers. */
  async dispose(graceMs = 5000): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    if (this.child.connected) this.child.disconnect();
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }

  private post(message: HostToServer): void {
    if (this.exitReason !== null) {
      const err = new ChatProcessError(this.exitReason);
      if (message.type === 'generate') this.settle(message.id, (p) => p.reject(err));
      if (message.type === 'load') this.takeLoadWaiter()?.reject(err);
      return;
    }
    this.child.send(message);
  }

  private receive(raw: unknown): void {
    let m;
    try {
      m = validateServerToHost(raw);
    } catch (err) {
      this.output.appendLine(`[chat] dropped an invalid message: ${(err as Error).message}`);
      // a load answered with something unreadable would otherwise leave the panel loading for ever
      if ((raw as { type?: unknown } | null)?.type === 'loaded')
        this.takeLoadWaiter()?.reject(new ChatProcessError(`the chat server's answer to the load could not be read: ${(err as Error).message}`));
      return;
    }
    switch (m.type) {
      case 'loaded':
        this.takeLoadWaiter()?.resolve(m.info);
        break;
      case 'delta':
        this.pending.get(m.id)?.onDelta(m.text);
        break;
      case 'done':
        this.settle(m.id, (p) => p.resolve({ text: m.text, stats: m.stats }));
        break;
      case 'error':
        if (m.id === null) {
          const waiter = this.takeLoadWaiter();
          if (waiter) waiter.reject(new ChatProcessError(m.message));
          else this.output.appendLine(`[chat] ${m.message}`);
        } else {
          this.settle(m.id, (p) => p.reject(new ChatProcessError(m.message)));
        }
        break;
    }
  }

  private takeLoadWaiter() {
    const w = this.loadWaiter;
    this.loadWaiter = null;
    return w;
  }

  private settle(id: number, f: (p: Pending) => void): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    f(p);
  }

  private fail(reason: string): void {
    if (this.exitReason !== null) return;
    this.exitReason = reason;
    const err = new ChatProcessError(reason);
    this.takeLoadWaiter()?.reject(err);
    for (const id of [...this.pending.keys()]) this.settle(id, (p) => p.reject(err));
  }
}
