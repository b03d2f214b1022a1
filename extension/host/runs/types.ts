// The contract between the parts of the extension host: the run registry (runs on disk and the live one) that the
// runs tree, the status bar and the training webviews all read from. Only the host imports vscode.
import type * as vscode from 'vscode';
import type { TrainerEvent } from '../../protocol/events';
import type { RunSnapshot, RunStatus } from '../../protocol/webview';

export interface RunInfo {
  runDir: string;
  /** The run folder's name. */
  name: string;
  status: RunStatus;
  step: number;
  totalSteps: number | null;
  /** The latest training loss, when a step has been taken. */
  loss: number | null;
  /** When the run last wrote an event. */
  updated: Date;
  /** Why a failed run failed. */
  error?: string;
  /** A running run that a process other than this window's trainer trains (another window, a terminal): which. */
  trainedBy?: string;
}

export interface RunSource {
  /** Every run in the runs directory, newest first, with the live run's state. */
  list(): RunInfo[];
  /** One run's events as drawn by the panels (events.jsonl plus what arrived live). */
  snapshot(runDir: string): RunSnapshot;
  /** The run a trainer process is running now, if any. */
  activeRun(): RunInfo | undefined;
  readonly onDidChangeRuns: vscode.Event<void>;
  readonly onDidReceiveEvent: vscode.Event<{ runDir: string; event: TrainerEvent }>;
  readonly onDidChangeStatus: vscode.Event<{ runDir: string; status: RunStatus; message?: string }>;
}
