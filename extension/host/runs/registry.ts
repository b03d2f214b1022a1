// The run registry: every run folder in the runs directory (read from its events.jsonl) and the live run (from the
// trainer's IPC events), behind the RunSource contract the tree, status bar and panels read. Logs are re-read only
// when they change; a broken log marks its run failed and never throws out. No vscode import (its events are
// vscode-compatible), so it is unit-tested on plain folders.
import * as path from 'node:path';
import type { TrainerEvent } from '../../protocol/events';
import type { RunSnapshot, RunStatus } from '../../protocol/webview';
import { Emitter } from '../emitter';
import type { ActiveRun, RunEnd, TrainerProcess } from '../trainerProcess';
import { deriveRunInfo, eventFileStamp, folderModified, hasCompleteCheckpoint, listRunFolders, readEventFile, type EventFile } from './runState';
import { liveRunLock } from '../../trainer/runLock';
import type { RunInfo, RunSource } from './types';

interface LiveRun {
  runDir: string;
  /** events.jsonl as it was when the process started (a resumed run's history); IPC events follow. */
  events: TrainerEvent[];
}

// Events that change what the tree shows; page and memory events (many per step) do not.
const LISTED_KINDS = new Set<TrainerEvent['kind']>(['run-started', 'step', 'checkpoint', 'error', 'finished']);

const same = (a: string, b: string) => path.resolve(a) === path.resolve(b);

export class RunRegistry implements RunSource {
  private readonly files = new Map<string, EventFile & { stamp: string }>();
  private readonly exitFailures = new Map<string, string>();
  private live: LiveRun | undefined;
  private runs: RunInfo[] | undefined;
  private refreshTimer: NodeJS.Timeout | undefined;
  private changeTimer: NodeJS.Timeout | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private trainedElsewhere = new Set<string>();
  private pendingStatus: { runDir: string; status: RunStatus; message?: string }[] = [];
  private disposed = false;
  private readonly changeEmitter = new Emitter<void>();
  private readonly eventEmitter = new Emitter<{ runDir: string; event: TrainerEvent }>();
  private readonly statusEmitter = new Emitter<{ runDir: string; status: RunStatus; message?: string }>();
  readonly onDidChangeRuns = this.changeEmitter.event;
  readonly onDidReceiveEvent = this.eventEmitter.event;
  readonly onDidChangeStatus = this.statusEmitter.event;
  private readonly subscriptions: { dispose(): void }[] = [];

  constructor(
    trainer: TrainerProcess,
    readonly runsDirectory: () => string,
    /** Delay that coalesces bursts of file changes and live steps into one onDidChangeRuns. */
    private readonly debounceMs = 250,
    /** How often runs that other processes train are re-read. */
    private readonly pollMs = 5000,
  ) {
    this.subscriptions.push(
      trainer.onDidStart((run) => this.started(run)),
      trainer.onDidReceiveEvent(({ runDir, event }) => this.received(runDir, event)),
      trainer.onDidEnd((end) => this.ended(end)),
    );
  }

  list(): RunInfo[] {
    if (!this.runs) this.assign(this.scan());
    return this.runs!;
  }

  activeRun(): RunInfo | undefined {
    const live = this.live;
    return live && this.list().find((r) => same(r.runDir, live.runDir));
  }

  snapshot(runDir: string): RunSnapshot {
    const name = path.basename(runDir);
    if (this.live && same(this.live.runDir, runDir)) return { runDir, name, status: 'running', events: [...this.live.events] };
    const file = this.eventFile(runDir);
    return { runDir, name, status: this.infoOf(runDir, file).status, events: [...file.events] };
  }

  /** Re-reads the runs directory now. */
  refresh(): void {
    this.assign(this.scan());
    this.changeEmitter.fire();
  }

  /** The new list, then the status changes the scan found, so that their listeners read the list they describe. */
  private assign(infos: RunInfo[]): void {
    this.runs = infos;
    const changes = this.pendingStatus;
    this.pendingStatus = [];
    for (const c of changes) this.statusEmitter.fire(c);
  }

  /**
   * Re-reads now and tells listeners only if what the list shows changed: for a periodic check beside the file
   * watcher, which does not report every change everywhere (remote and web hosts, folders created after it).
   */
  refreshIfChanged(): void {
    const before = JSON.stringify(this.runs ?? null);
    this.assign(this.scan());
    if (JSON.stringify(this.runs) !== before) this.changeEmitter.fire();
  }

  /** Re-reads soon: for file watchers, whose changes come in bursts. */
  scheduleRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = undefined;
      this.refresh();
    }, this.debounceMs);
  }

  dispose(): void {
    this.disposed = true;
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    if (this.changeTimer) clearTimeout(this.changeTimer);
    if (this.pollTimer) clearTimeout(this.pollTimer);
    for (const s of this.subscriptions) s.dispose();
    this.changeEmitter.dispose();
    this.eventEmitter.dispose();
    this.statusEmitter.dispose();
  }

  private eventFile(runDir: string): EventFile {
    const stamp = eventFileStamp(runDir);
    const cached = this.files.get(runDir);
    if (cached && cached.stamp === stamp) return cached;
    const file = { ...readEventFile(runDir), stamp };
    // A run another process trains (or trained until this read) reaches the panels through its log: what was
    // appended since the last read, as this window's trainer sends it over IPC (the log only grows meanwhile).
    const live = this.live !== undefined && same(this.live.runDir, runDir);
    const follow = cached !== undefined && !live && file.events.length > cached.events.length && (this.trainedElsewhere.has(runDir) || liveRunLock(runDir) !== null);
    if (!follow) {
      this.files.set(runDir, file);
      return file;
    }
    // The cached log grows event by event as each is announced: a snapshot a listener takes meanwhile (a panel
    // switching to the run on its run-started) holds the events announced so far, and the rest reach it as events.
    const growing = { ...file, events: [...cached.events] };
    this.files.set(runDir, growing);
    for (const event of file.events.slice(cached.events.length)) {
      growing.events.push(event);
      this.eventEmitter.fire({ runDir, event });
    }
    return growing;
  }

  private infoOf(runDir: string, file: EventFile): RunInfo {
    const isLive = this.live !== undefined && same(this.live.runDir, runDir);
    return deriveRunInfo({
      runDir,
      events: isLive ? this.live!.events : file.events,
      parseError: isLive ? undefined : file.parseError,
      hasCheckpoint: hasCompleteCheckpoint(runDir),
      live: isLive,
      lockedBy: isLive ? null : liveRunLock(runDir),
      exitFailure: this.exitFailures.get(runDir),
      modified: folderModified(runDir),
    });
  }

  private scan(): RunInfo[] {
    const folders = listRunFolders(this.runsDirectory());
    for (const key of this.files.keys()) if (!folders.includes(key)) this.files.delete(key);
    const infos = folders.map((dir) => this.infoOf(dir, this.eventFile(dir)));
    // The live run shows from the moment it starts, before the trainer has written its folder.
    if (this.live && !infos.some((r) => same(r.runDir, this.live!.runDir))) infos.push(this.infoOf(this.live.runDir, { events: [] }));
    this.noticeOtherTrainers(infos);
    return infos.sort((a, b) => b.updated.getTime() - a.updated.getTime());
  }

  /**
   * Runs that another process trains: their status changes are announced like the live run's, and while any is
   * training the folder is re-read every few seconds, since a kill of that process changes no file to watch.
   */
  private noticeOtherTrainers(infos: readonly RunInfo[]): void {
    const now = new Set(infos.filter((r) => r.trainedBy !== undefined).map((r) => r.runDir));
    for (const runDir of this.trainedElsewhere) {
      if (now.has(runDir) || (this.live && same(this.live.runDir, runDir))) continue;
      const info = infos.find((r) => r.runDir === runDir);
      // gone from the list (its folder removed, or the runs directory changed): it trains on, but not here
      if (!info) this.pendingStatus.push({ runDir, status: 'stopped' });
      else this.pendingStatus.push(info.error === undefined ? { runDir, status: info.status } : { runDir, status: info.status, message: info.error });
    }
    for (const runDir of now) {
      if (this.trainedElsewhere.has(runDir)) continue;
      // what this window saw of the run before (a crash, a resume the other trainer's lock refused) is history now
      this.exitFailures.delete(runDir);
      this.pendingStatus.push({ runDir, status: 'running' });
    }
    this.trainedElsewhere = now;
    if (this.pollTimer) clearTimeout(this.pollTimer);
    this.pollTimer = undefined;
    if (now.size === 0 || this.disposed) return;
    this.pollTimer = setTimeout(() => {
      this.pollTimer = undefined;
      this.refresh();
    }, this.pollMs);
    this.pollTimer.unref?.();
  }

  private changedSoon(): void {
    if (this.changeTimer) return;
    this.changeTimer = setTimeout(() => {
      this.changeTimer = undefined;
      this.refresh();
    }, this.debounceMs);
  }

  private started(run: ActiveRun): void {
    this.exitFailures.delete(run.runDir);
    this.live = { runDir: run.runDir, events: run.verb === 'resume' ? [...readEventFile(run.runDir).events] : [] };
    this.refresh();
    this.statusEmitter.fire({ runDir: run.runDir, status: 'running' });
  }

  private received(runDir: string, event: TrainerEvent): void {
    if (!this.live || !same(this.live.runDir, runDir)) return;
    this.live.events.push(event);
    this.eventEmitter.fire({ runDir, event });
    if (LISTED_KINDS.has(event.kind)) this.changedSoon();
  }

  private ended(end: RunEnd): void {
    if (this.live && same(this.live.runDir, end.runDir)) this.live = undefined;
    // A trainer of this window that ended while another process holds the run's lock was refused by that lock
    // (a race with a terminal's resume): the run is not failed, it trains elsewhere; the reason is in the output.
    if (end.status === 'failed' && liveRunLock(end.runDir) !== null) {
      this.refresh();
      return;
    }
    if (end.status === 'failed' && end.reason !== undefined) this.exitFailures.set(end.runDir, end.reason);
    this.refresh();
    const message = end.status === 'failed' ? end.reason : undefined;
    this.statusEmitter.fire(message === undefined ? { runDir: end.runDir, status: end.status } : { runDir: end.runDir, status: end.status, message });
  }
}
