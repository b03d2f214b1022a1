// What a run folder says about its run: status, progress and failure reason derived from events.jsonl, plus the
// scan of a runs directory. Pure Node (no vscode), so the rules are unit-tested directly.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseEventLog, type TrainerEvent } from '../../protocol/events';
import { describeRunLock, type RunLock } from '../../trainer/runLock';
import { isAlive } from '../../util/staleTemp';
import type { RunStatus } from '../../protocol/webview';
import type { RunInfo } from './types';

export interface RunFacts {
  runDir: string;
  events: readonly TrainerEvent[];
  /** Why events.jsonl could not be read; the run then shows as failed with this reason. */
  parseError?: string;
  /** Whether checkpoints/ holds a complete (DONE) checkpoint to resume from. */
  hasCheckpoint: boolean;
  /** A trainer process of this host is running the run now. */
  live: boolean;
  /** Another live process holds the run's trainer.lock (another window's trainer, a terminal's): it is training. */
  lockedBy?: RunLock | null;
  /** Why this host's trainer process for the run ended badly (crash, kill) when no event says so. */
  exitFailure?: string;
  /** When the folder last changed, for runs with no events yet. */
  modified: Date;
}

// A resumed run appends a new run-started to the same log: only the events from the last one on describe the
// current attempt (an earlier "stopped" or error is history).
function currentAttempt(events: readonly TrainerEvent[]): readonly TrainerEvent[] {
  for (let i = events.length - 1; i >= 0; i--) if (events[i].kind === 'run-started') return events.slice(i);
  return events;
}

export function deriveStatus(facts: RunFacts): { status: RunStatus; error?: string } {
  if (facts.live || facts.lockedBy) return { status: 'running' };
  if (facts.parseError !== undefined) return { status: 'failed', error: facts.parseError };
  // This window saw the process end badly: that outranks what the log says (it may end with a clean-looking event).
  if (facts.exitFailure !== undefined) return { status: 'failed', error: facts.exitFailure };
  const attempt = currentAttempt(facts.events);
  let finished: Extract<TrainerEvent, { kind: 'finished' }> | undefined;
  let lastError: string | undefined;
  for (const e of attempt) {
    if (e.kind === 'finished') finished = e;
    else if (e.kind === 'error') lastError = e.message;
  }
  if (finished) {
    if (finished.status === 'completed') return { status: 'finished' };
    if (finished.status === 'stopped') return { status: 'stopped' };
    return { status: 'failed', error: lastError ?? 'the trainer reported a failure' };
  }
  if (lastError !== undefined) return { status: 'failed', error: lastError };
  // Killed without a word (a closed terminal, a crash before this window saw it): resumable when a checkpoint exists.
  if (facts.hasCheckpoint) return { status: 'stopped' };
  return { status: 'failed', error: 'the trainer ended without finishing and left no checkpoint' };
}

export function deriveRunInfo(facts: RunFacts): RunInfo {
  let step = 0;
  let totalSteps: number | null = null;
  let loss: number | null = null;
  for (const e of facts.events) {
    if (e.kind === 'run-started') totalSteps = e.totalSteps;
    else if (e.kind === 'step') {
      step = e.step;
      totalSteps = e.totalSteps;
      // A diverged loss is written as null (JSON has no NaN).
      loss = typeof e.loss === 'number' ? e.loss : null;
    } else if (e.kind === 'finished') step = e.step;
  }
  const last = facts.events[facts.events.length - 1];
  const lastTime = last ? Date.parse(last.time) : NaN;
  const { status, error } = deriveStatus(facts);
  const info: RunInfo = {
    runDir: facts.runDir,
    name: path.basename(facts.runDir),
    status,
    step,
    totalSteps,
    loss,
    updated: Number.isFinite(lastTime) ? new Date(lastTime) : facts.modified,
  };
  if (error !== undefined) info.error = error;
  if (facts.lockedBy) info.trainedBy = describeRunLock(facts.lockedBy);
  return info;
}

/**
 * Whether resume has a checkpoint to go on from: a complete step-N, or one a trainer killed while replacing it left
 * set aside (`.step-N.old-<pid>` of a process that is gone), which resume puts back.
 */
export function hasCompleteCheckpoint(runDir: string): boolean {
  const dir = path.join(runDir, 'checkpoints');
  try {
    return fs.readdirSync(dir).some((name) => {
      const aside = /^\.step-\d+\.old-(\d+)$/.exec(name);
      if (!/^step-\d+$/.test(name) && !(aside && !isAlive(Number(aside[1])))) return false;
      return fs.existsSync(path.join(dir, name, 'DONE'));
    });
  } catch {
    return false;
  }
}

export interface EventFile {
  events: TrainerEvent[];
  parseError?: string;
}

/**
 * The largest events.jsonl the window reads: a run of a million steps writes about 300 MiB. A larger file in a runs
 * folder is no log the panels could draw, and reading it would stall the window (the extension host) meanwhile.
 */
export const MAX_EVENT_LOG_BYTES = 384 * 1024 * 1024;

/** Reads <run>/events.jsonl; a missing file is no events yet, a broken or oversized one a parse error (never thrown). */
export function readEventFile(runDir: string, maxBytes = MAX_EVENT_LOG_BYTES): EventFile {
  const file = path.join(runDir, 'events.jsonl');
  let text: string;
  try {
    const size = fs.statSync(file).size;
    if (size > maxBytes) return { events: [], parseError: `events.jsonl is ${(size / 1048576).toFixed(0)} MiB, more than the window reads (${(maxBytes / 1048576).toFixed(0)} MiB)` };
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { events: [] };
    return { events: [], parseError: `cannot read events.jsonl (${(err as NodeJS.ErrnoException).code ?? String(err)})` };
  }
  try {
    return { events: parseEventLog(text, path.join(path.basename(runDir), 'events.jsonl')).events };
  } catch (err) {
    return { events: [], parseError: err instanceof Error ? err.message : String(err) };
  }
}

/** The run folders (those with config.json) directly inside a runs directory; none when it does not exist. */
export function listRunFolders(runsDir: string): string[] {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(runsDir, { withFileTypes: true });
  } catch {
    return [];
  }
  return entries
    .filter((e) => e.isDirectory() && fs.existsSync(path.join(runsDir, e.name, 'config.json')))
    .map((e) => path.join(runsDir, e.name));
}

/** A key that changes whenever events.jsonl does (appends change size and mtime), so unchanged logs are not re-read. */
export function eventFileStamp(runDir: string): string {
  try {
    const s = fs.statSync(path.join(runDir, 'events.jsonl'));
    return `${s.size}:${s.mtimeMs}`;
  } catch {
    return 'none';
  }
}

export function folderModified(runDir: string): Date {
  for (const name of ['events.jsonl', 'config.json']) {
    try {
      return fs.statSync(path.join(runDir, name)).mtime;
    } catch {
      // try the next
    }
  }
  return new Date(0);
}
