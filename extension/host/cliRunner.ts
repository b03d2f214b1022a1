// Runs one qlora-studio CLI verb to completion (engine-info, inspect-data, estimate, export, merge) as a child
// process with an argument array, and reads its JSON answer. The CLI's error sentence becomes the error message.
import { execFile } from 'node:child_process';
import type { TrainerLaunch } from './trainerProcess';

export class CliError extends Error {
  override readonly name = 'CliError';
}

export interface CliOptions {
  /** Milliseconds before the process is killed; 0: no limit (merges of big models take long). */
  timeoutMs?: number;
  /** Aborts the process (a cancelled progress notification). */
  signal?: AbortSignal;
  /** Each line the verb prints to stderr as it goes (its progress). */
  onStderrLine?(line: string): void;
  /** Exit statuses besides 0 after which the verb's output is still its answer (inspect-data's 2: invalid rows). */
  answerExitCodes?: readonly number[];
}

export function runCli(launch: TrainerLaunch, args: readonly string[], options: CliOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      launch.execPath,
      [launch.cliPath, ...args],
      {
        env: { ...process.env, ELECTRON_RUN_AS_NODE: '1' },
        timeout: options.timeoutMs ?? 0,
        signal: options.signal,
        maxBuffer: 64 * 1024 * 1024,
        windowsHide: true,
      },
      (err, stdout, stderr) => {
        if (!err || (typeof err.code === 'number' && options.answerExitCodes?.includes(err.code))) return resolve(stdout);
        const sentence = stderr
          .split(/\r?\n/)
          .find((l) => l.startsWith('qlora-studio: '))
          ?.slice('qlora-studio: '.length);
        if (sentence) return reject(new CliError(sentence));
        if (err.name === 'AbortError') return reject(new CliError('cancelled'));
        if (err.killed) return reject(new CliError(`${args[0]} did not finish in time`));
        reject(new CliError(stderr.trim() || err.message));
      },
    );
    const onLine = options.onStderrLine;
    if (onLine && child.stderr) {
      let pending = '';
      child.stderr.on('data', (chunk: Buffer | string) => {
        const lines = (pending + chunk.toString()).split(/\r?\n/);
        pending = lines.pop() ?? '';
        for (const line of lines) if (line.trim() !== '') onLine(line);
      });
    }
  });
}

export async function runCliJson<T>(launch: TrainerLaunch, args: readonly string[], options: CliOptions = {}): Promise<T> {
  const stdout = await runCli(launch, [...args, '--json'], options);
  try {
    return JSON.parse(stdout) as T;
  } catch {
    throw new CliError(`${args[0]} printed no JSON: ${stdout.slice(0, 200)}`);
  }
}
