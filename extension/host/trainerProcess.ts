// The trainer process: `cli.js train|resume ... --json` forked with an IPC channel. Events arrive over IPC and are
// validated before anyone sees them; stdout/stderr lines go to the output channel; stop / save-now go back as
// control messages. However the process ends (clean finish, stop, crash, kill, a spawn failure), the run ends with
// a status and, when it failed, one sentence saying why. One run at a time. No vscode import, so it is unit-tested
// with a fake child process.
import { fork, type ChildProcess, type ForkOptions } from 'node:child_process';
import * as path from 'node:path';
import { validateEvent, validatePreparing, type ControlMessage, type FinishedEvent, type PreparingMessage, type TrainerEvent } from '../protocol/events';
import type { RunStatus } from '../protocol/webview';
import { Emitter } from './emitter';

export interface OutputSink {
  appendLine(line: string): void;
}

export interface TrainerLaunch {
  /** dist/cli.js of this extension. */
  cliPath: string;
  /** The Node executable (the qlora.nodePath setting, else VS Code's own runtime). */
  execPath: string;
}

export type ForkFunction = (modulePath: string, args: readonly string[], options: ForkOptions) => ChildProcess;

/**
 * `cli.js <args>` as a child with an IPC channel and piped stdout/stderr (the trainer, the chat server). VS Code's own
 * binary acts as plain Node with ELECTRON_RUN_AS_NODE; execArgv is cleared so the extension host's inspector and
 * loader flags do not leak into the child.
 */
export function forkCli(forkFn: ForkFunction, launch: TrainerLaunch, args: readonly string[]): ChildProcess {
  // Windows: no console window for a node.exe (qlora.nodePath); closing one would end the trainer unsaved. fork
  // hands its options to spawn, which takes windowsHide, though ForkOptions does not declare it.
  const options: ForkOptions & { windowsHide: boolean } = {
    execPath: launch.execPath,
    execArgv: [],
    env: { ...process.env, ELECTRON_RUN_AS_NODE: '1' },
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    windowsHide: true,
  };
  return forkFn(launch.cliPath, args, options);
}

export interface RunEnd {
  runDir: string;
  status: Exclude<RunStatus, 'running'>;
  /** Why it failed: the trainer's error event, else its last stderr sentence, else the exit code or signal. */
  reason?: string;
  /** The trainer's own finished event, when it wrote one. */
  finished?: FinishedEvent;
}

export interface ActiveRun {
  runDir: string;
  name: string;
  verb: 'train' | 'resume';
  /** Resolves when the process has ended and its end has been reported. */
  ended: Promise<RunEnd>;
}

export class TrainerBusyError extends Error {
  override readonly name = 'TrainerBusyError';
}

/** Splits a byte stream into lines; a last line without newline is delivered by flush(). */
export class LineSplitter {
  private rest = '';
  constructor(private readonly onLine: (line: string) => void) {}

  push(chunk: string): void {
    const lines = (this.rest + chunk).split(/\r?\n/);
    this.rest = lines.pop() ?? '';
    for (const line of lines) this.onLine(line);
  }

  flush(): void {
    if (this.rest !== '') this.onLine(this.rest);
    this.rest = '';
  }
}

const CLI_PREFIX = 'qlora-studio: ';
const USAGE_HINT = /^run "qlora-studio .*--help" for usage$/;

/** The sentence to show for a trainer that died: its error line ("qlora-studio: ..."), else its last stderr line. */
export function failureFromStderr(lines: readonly string[]): string | undefined {
  for (let i = lines.length - 1; i >= 0; i--) if (lines[i].startsWith(CLI_PREFIX)) return lines[i].slice(CLI_PREFIX.length).trim();
  for (let i = lines.length - 1; i >= 0; i--) {
    const line = lines[i].trim();
    if (line !== '' && !USAGE_HINT.test(line)) return line;
  }
  return undefined;
}

/** How a run ended, from what the process said and how it exited. */
export function runEnd(runDir: string, o: { code: number | null; signal: NodeJS.Signals | null; finished?: FinishedEvent; lastError?: string; stderr: readonly string[]; spawnError?: string }): RunEnd {
  if (o.code === 0 && o.finished && o.finished.status !== 'failed')
    return { runDir, status: o.finished.status === 'completed' ? 'finished' : 'stopped', finished: o.finished };
  const reason =
    o.lastError ??
    (o.spawnError !== undefined ? `the trainer could not start: ${o.spawnError}` : undefined) ??
    failureFromStderr(o.stderr) ??
    (o.signal ? `the trainer process was killed (${o.signal})` : `the trainer process exited with code ${o.code}`);
  return o.finished ? { runDir, status: 'failed', reason, finished: o.finished } : { runDir, status: 'failed', reason };
}

const STDERR_LINES_KEPT = 50;

export class TrainerProcess {
  private current: (ActiveRun & { child: ChildProcess }) | undefined;
  private readonly startEmitter = new Emitter<ActiveRun>();
  private readonly eventEmitter = new Emitter<{ runDir: string; event: TrainerEvent }>();
  private readonly endEmitter = new Emitter<RunEnd>();
  private readonly preparingEmitter = new Emitter<{ runDir: string; preparing: PreparingMessage }>();
  /** What the live trainer prepares before its run starts (tokenizing the data, loading the model). */
  readonly onDidPrepare = this.preparingEmitter.event;
  /** A trainer process started for a run. */
  readonly onDidStart = this.startEmitter.event;
  /** A validated event from the live trainer. */
  readonly onDidReceiveEvent = this.eventEmitter.event;
  /** The trainer process ended (after its last event and output line). */
  readonly onDidEnd = this.endEmitter.event;

  constructor(
    private readonly launch: () => TrainerLaunch,
    private readonly output: OutputSink,
    private readonly forkFn: ForkFunction = fork,
  ) {}

  get active(): ActiveRun | undefined {
    return this.current;
  }

  /**
   * Starts `train <args> --out <runDir> --json` or `resume --run <runDir> <args> --json`. Throws TrainerBusyError while
   * another run trains.
   */
  start(verb: 'train' | 'resume', runDir: string, trainArgs: readonly string[] = []): ActiveRun {
    if (this.current) throw new TrainerBusyError(`A run is already training (${this.current.name}); stop it first.`);
    const { cliPath, execPath } = this.launch();
    const args = verb === 'train' ? ['train', ...trainArgs, '--out', runDir, '--json'] : ['resume', '--run', runDir, ...trainArgs, '--json'];
    this.output.appendLine(`[${new Date().toLocaleTimeString()}] ${verb} ${runDir}`);
    this.output.appendLine(`$ ${[execPath, cliPath, ...args].map((a) => (/\s/.test(a) ? JSON.stringify(a) : a)).join(' ')}`);

    const child = forkCli(this.forkFn, { cliPath, execPath }, args);

    const stderr: string[] = [];
    let finished: FinishedEvent | undefined;
    let lastError: string | undefined;
    let spawnError: string | undefined;
    let resolveEnded!: (end: RunEnd) => void;
    const ended = new Promise<RunEnd>((resolve) => (resolveEnded = resolve));
    const run = { runDir, name: path.basename(runDir), verb, ended, child };

    const out = new LineSplitter((line) => this.output.appendLine(line));
    const err = new LineSplitter((line) => {
      this.output.appendLine(line);
      stderr.push(line);
      if (stderr.length > STDERR_LINES_KEPT) stderr.shift();
    });
    child.stdout?.setEncoding('utf8').on('data', (chunk: string) => out.push(chunk));
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => err.push(chunk));

    child.on('message', (message: unknown) => {
      let event: TrainerEvent;
      try {
        const preparing = validatePreparing(message);
        if (preparing !== null) {
          this.preparingEmitter.fire({ runDir, preparing });
          return;
        }
        event = validateEvent(message);
      } catch (e) {
        this.output.appendLine(`ignored a malformed message from the trainer: ${e instanceof Error ? e.message : String(e)}`);
        return;
      }
      if (event.kind === 'finished') finished = event;
      else if (event.kind === 'error') lastError = event.message;
      this.eventEmitter.fire({ runDir, event });
    });

    let done = false;
    const finish = (code: number | null, signal: NodeJS.Signals | null) => {
      if (done) return;
      done = true;
      out.flush();
      err.flush();
      const end = runEnd(runDir, { code, signal, finished, lastError, stderr, spawnError });
      this.output.appendLine(`[${new Date().toLocaleTimeString()}] ${run.name}: ${end.status}${end.reason ? ` (${end.reason})` : ''}`);
      if (this.current === run) this.current = undefined;
      this.endEmitter.fire(end);
      resolveEnded(end);
    };
    child.on('error', (e: Error) => {
      // only a process that never started failed to start; a running one's errors (a send on a closing channel)
      // are logged, and its end is explained by its exit
      if (child.pid === undefined) spawnError = e.message;
      this.output.appendLine(`trainer process error: ${e.message}`);
      // A process that never started emits no 'close' on every platform; end the run here.
      if (child.pid === undefined) finish(null, null);
    });
    // 'close' comes after the last stdout/stderr data, so the failure reason sees every line.
    child.on('close', (code: number | null, signal: NodeJS.Signals | null) => finish(code, signal));

    this.current = run;
    this.startEmitter.fire(run);
    return run;
  }

  /** Sends a control message to the live trainer; false when none is running or its channel is closed. */
  send(message: ControlMessage): boolean {
    const child = this.current?.child;
    if (!child || !child.connected) return false;
    try {
      return child.send(message);
    } catch (e) {
      this.output.appendLine(`could not send ${message.kind} to the trainer: ${e instanceof Error ? e.message : String(e)}`);
      return false;
    }
  }

  /** Asks the live run to stop after its current step (it writes a final checkpoint). */
  stop(): boolean {
    const run = this.current;
    if (!run) return false;
    if (this.send({ kind: 'stop' })) return true;
    // No IPC channel left: SIGTERM is the trainer's other graceful stop.
    return run.child.kill('SIGTERM');
  }

  /** Quits the live run at once (the user's choice after a stop it did not finish): its end is reported as a kill. */
  kill(): boolean {
    return this.current?.child.kill('SIGKILL') ?? false;
  }

  /**
   * For deactivate: asks the live run to stop and waits up to `graceMs` for it to exit. A trainer still in its step
   * then is not killed, which would lose the step's work: it is disconnected and stops by itself at the step's end,
   * with a checkpoint (the trainer treats a lost channel as a stop). Until then its trainer.lock shows the run as
   * training in the next window, where Stop can still reach it.
   */
  async shutdown(graceMs = 3000): Promise<void> {
    const run = this.current;
    if (!run) return;
    this.stop();
    const exited = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), graceMs);
      void run.ended.then(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    if (exited) return;
    this.output.appendLine(`the trainer of ${run.name} (process ${run.child.pid ?? '?'}) finishes its step, saves a checkpoint and exits on its own`);
    if (run.child.connected) run.child.disconnect();
  }

  dispose(): void {
    this.startEmitter.dispose();
    this.eventEmitter.dispose();
    this.endEmitter.dispose();
  }
}
