// One training webview bound to the run registry: serves the HTML, answers {ready} with the shown run's snapshot,
// streams that run's events and status changes, and turns validated button presses into commands. Shared by the
// side view (which follows new runs) and the run editor panels (one run each).
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { TrainerEvent } from '../../protocol/events';
import { validateWebviewMessage, type HostToWebview, type RunStatus, type WebviewToHost } from '../../protocol/webview';
import type { RunSource } from '../runs/types';
import { resolveAction } from './actions';
import { buildWebviewHtml, makeNonce } from './html';

const same = (a: string | undefined, b: string | undefined) => a !== undefined && b !== undefined && path.resolve(a) === path.resolve(b);

/** Webview options for every training webview: scripts on, local files from dist/ and media/ only. */
export function webviewOptions(extensionUri: vscode.Uri): vscode.WebviewOptions {
  return { enableScripts: true, localResourceRoots: [vscode.Uri.joinPath(extensionUri, 'dist'), vscode.Uri.joinPath(extensionUri, 'media')] };
}

/** The HTML of a webview running the app bundled as dist/<bundle>.js and dist/<bundle>.css. */
export function webviewHtml(webview: vscode.Webview, extensionUri: vscode.Uri, title: string, bundle: 'webview' | 'chat' = 'webview'): string {
  const dist = (file: string) => webview.asWebviewUri(vscode.Uri.joinPath(extensionUri, 'dist', file)).toString();
  return buildWebviewHtml({ cspSource: webview.cspSource, scriptUri: dist(`${bundle}.js`), styleUri: dist(`${bundle}.css`), nonce: makeNonce(), title });
}

/** The run a restored webview showed, from the state it saved with setState ({runDir}); anything else: none. */
export function savedRunDir(state: unknown): string | undefined {
  const runDir = (state as { runDir?: unknown } | null | undefined)?.runDir;
  return typeof runDir === 'string' && runDir !== '' ? runDir : undefined;
}

export interface SessionOptions {
  /** The side view switches to a run as soon as it starts; a run panel stays on its run. */
  followNewRuns: boolean;
}

export class RunWebviewSession implements vscode.Disposable {
  /** Whether the webview's script has said {ready}; before that (and after it is torn down) nothing is posted. */
  private ready = false;
  private readonly subscriptions: vscode.Disposable[];

  constructor(
    private readonly webview: vscode.Webview,
    private readonly runs: RunSource,
    private shown: string | undefined,
    private readonly options: SessionOptions,
  ) {
    this.subscriptions = [
      webview.onDidReceiveMessage((m: unknown) => this.receive(m)),
      runs.onDidReceiveEvent(({ runDir, event }) => this.event(runDir, event)),
      runs.onDidChangeStatus(({ runDir, status, message }) => this.status(runDir, status, message)),
    ];
  }

  get runDir(): string | undefined {
    return this.shown;
  }

  /** Shows another run (or none); the webview redraws from its snapshot. */
  show(runDir: string | undefined): void {
    this.shown = runDir;
    if (this.ready) this.postSnapshot();
  }

  /** The webview's document is gone (hidden without retained context); it reloads and says {ready} again. */
  detached(): void {
    this.ready = false;
  }

  dispose(): void {
    for (const s of this.subscriptions) s.dispose();
  }

  private post(message: HostToWebview): void {
    // A webview that is being torn down drops the message; the next {ready} brings a full snapshot anyway.
    void this.webview.postMessage(message).then(undefined, () => undefined);
  }

  private postSnapshot(): void {
    const runDir = this.shown;
    if (runDir === undefined) return this.post({ type: 'show', run: null });
    try {
      this.post({ type: 'show', run: this.runs.snapshot(runDir) });
    } catch (err) {
      console.warn(`qlora panel: cannot read run ${runDir}:`, err);
      this.post({ type: 'show', run: null });
    }
  }

  private event(runDir: string, event: TrainerEvent): void {
    if (same(runDir, this.shown)) {
      if (this.ready) this.post({ type: 'event', runDir: this.shown!, event });
    } else if (this.options.followNewRuns && event.kind === 'run-started') {
      // The snapshot already holds this event (the registry records it before telling listeners).
      this.show(runDir);
    }
  }

  private status(runDir: string, status: RunStatus, message: string | undefined): void {
    if (same(runDir, this.shown)) {
      if (this.ready) this.post(message === undefined ? { type: 'status', runDir: this.shown!, status } : { type: 'status', runDir: this.shown!, status, message });
    } else if (this.options.followNewRuns && status === 'running') {
      this.show(runDir);
    }
  }

  private receive(raw: unknown): void {
    let message: WebviewToHost;
    try {
      message = validateWebviewMessage(raw);
    } catch (err) {
      console.warn('qlora panel: dropped an invalid webview message:', err instanceof Error ? err.message : err);
      return;
    }
    if (message.type === 'ready') {
      this.ready = true;
      this.postSnapshot();
      return;
    }
    const action = resolveAction(message, this.shown);
    if ('rejected' in action) {
      console.warn(`qlora panel: dropped the action ${action.rejected}`);
      return;
    }
    void vscode.commands.executeCommand(action.command, ...action.args).then(undefined, (err: unknown) => {
      void vscode.window.showErrorMessage(`QLoRA: ${err instanceof Error ? err.message : String(err)}`);
    });
  }
}
