// The side bar's Training view (qlora.trainingView): the live run, else the run it showed before a reload if that
// still exists, else the newest run; it switches to each run that starts and follows its events.
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { RunSource } from '../runs/types';
import { RunWebviewSession, savedRunDir, webviewHtml, webviewOptions } from './session';

export const TRAINING_VIEW_ID = 'qlora.trainingView';

export class TrainingViewProvider implements vscode.WebviewViewProvider, vscode.Disposable {
  private session: RunWebviewSession | undefined;
  private readonly viewSubscriptions: vscode.Disposable[] = [];
  private readonly subscriptions: vscode.Disposable[];

  constructor(private readonly extensionUri: vscode.Uri, private readonly runs: RunSource) {
    // A deleted run, or the first run appearing in an empty view: pick again.
    this.subscriptions = [runs.onDidChangeRuns(() => {
      const shown = this.session?.runDir;
      if (this.session && (shown === undefined || !this.exists(shown))) this.session.show(this.pick(undefined));
    })];
  }

  resolveWebviewView(view: vscode.WebviewView, context: vscode.WebviewViewResolveContext): void {
    this.disposeView();
    view.webview.options = webviewOptions(this.extensionUri);
    view.webview.html = webviewHtml(view.webview, this.extensionUri, 'Training');
    const session = new RunWebviewSession(view.webview, this.runs, this.pick(savedRunDir(context.state)), { followNewRuns: true });
    this.session = session;
    this.viewSubscriptions.push(
      session,
      // Without retained context a hidden view's document is destroyed; it reloads and says ready when shown.
      view.onDidChangeVisibility(() => {
        if (!view.visible) session.detached();
      }),
      view.onDidDispose(() => this.disposeView()),
    );
  }

  dispose(): void {
    this.disposeView();
    for (const s of this.subscriptions) s.dispose();
  }

  private exists(runDir: string): boolean {
    return this.runs.list().some((r) => path.resolve(r.runDir) === path.resolve(runDir));
  }

  private pick(saved: string | undefined): string | undefined {
    const active = this.runs.activeRun();
    if (active) return active.runDir;
    if (saved !== undefined && this.exists(saved)) return saved;
    return this.runs.list()[0]?.runDir;
  }

  private disposeView(): void {
    for (const s of this.viewSubscriptions.splice(0)) s.dispose();
    this.session = undefined;
  }
}
