// Messages between the extension host and the training webviews (the side panel and the run editor panel).
// Host → webview carries trainer events (extension/protocol/events.ts) and run state; webview → host carries user
// intents, each validated here before the host acts on it. Payloads stay JSON-safe.
import { validateEvent, type TrainerEvent } from './events';

export type RunStatus = 'running' | 'finished' | 'stopped' | 'failed';

/** What the panel needs to draw one run: its folder, status and every event so far (from events.jsonl). */
export interface RunSnapshot {
  runDir: string;
  name: string;
  status: RunStatus;
  events: TrainerEvent[];
}

export type HostToWebview =
  /** The run to show (null: no run yet), replacing whatever was shown. */
  | { type: 'show'; run: RunSnapshot | null }
  /** A new event of the run on show. */
  | { type: 'event'; runDir: string; event: TrainerEvent }
  /** The run's status changed (started, ended, failed). */
  | { type: 'status'; runDir: string; status: RunStatus; message?: string };

export type PanelAction = 'stop' | 'resume' | 'try' | 'export' | 'merge' | 'gguf' | 'openFolder' | 'newFinetune';
export const PANEL_ACTIONS: readonly PanelAction[] = ['stop', 'resume', 'try', 'export', 'merge', 'gguf', 'openFolder', 'newFinetune'];

export type WebviewToHost =
  /** The webview has loaded its script and can receive messages. */
  | { type: 'ready' }
  /** A button: act on the run on show (runDir as the webview knows it; the host checks it is that run). */
  | { type: 'action'; action: PanelAction; runDir: string | null };

export class WebviewMessageError extends Error {
  override readonly name = 'WebviewMessageError';
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Validates a message from a webview; anything else is rejected (the webview is untrusted content). */
export function validateWebviewMessage(value: unknown): WebviewToHost {
  if (!isObject(value)) throw new WebviewMessageError('a webview message must be an object');
  if (value.type === 'ready') return { type: 'ready' };
  if (value.type === 'action') {
    if (typeof value.action !== 'string' || !(PANEL_ACTIONS as readonly string[]).includes(value.action))
      throw new WebviewMessageError(`unknown panel action ${JSON.stringify(value.action)}`);
    if (value.runDir !== null && typeof value.runDir !== 'string') throw new WebviewMessageError('runDir must be a string or null');
    return { type: 'action', action: value.action as PanelAction, runDir: value.runDir as string | null };
  }
  throw new WebviewMessageError(`unknown webview message type ${JSON.stringify(value.type)}`);
}

/** Validates a message from the host inside the webview (defence in depth: it is our own, but typed). */
export function validateHostMessage(value: unknown): HostToWebview {
  if (!isObject(value)) throw new WebviewMessageError('a host message must be an object');
  switch (value.type) {
    case 'show': {
      if (value.run === null) return { type: 'show', run: null };
      const run = value.run;
      if (!isObject(run) || typeof run.runDir !== 'string' || typeof run.name !== 'string' || !Array.isArray(run.events))
        throw new WebviewMessageError('show: run must have runDir, name and events');
      if (!['running', 'finished', 'stopped', 'failed'].includes(run.status as string)) throw new WebviewMessageError('show: bad run status');
      return { type: 'show', run: { runDir: run.runDir, name: run.name, status: run.status as RunStatus, events: run.events.map(validateEvent) } };
    }
    case 'event':
      if (typeof value.runDir !== 'string') throw new WebviewMessageError('event: runDir must be a string');
      return { type: 'event', runDir: value.runDir, event: validateEvent(value.event) };
    case 'status':
      if (typeof value.runDir !== 'string' || !['running', 'finished', 'stopped', 'failed'].includes(value.status as string))
        throw new WebviewMessageError('status: bad runDir or status');
      return { type: 'status', runDir: value.runDir, status: value.status as RunStatus, message: typeof value.message === 'string' ? value.message : undefined };
    default:
      throw new WebviewMessageError(`unknown host message type ${JSON.stringify(value.type)}`);
  }
}
