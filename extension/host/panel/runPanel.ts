// Run editor panels: one WebviewPanel per run folder (reused when opened again), opened by the internal command
// qlora.internal.openRunPanel (the Runs view and qlora.openRun call it). Context is not retained while hidden, so
// a panel that comes back redraws from the run's snapshot; the serializer brings panels back after a window reload
// from the {runDir} state the webview saved.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { RunSource } from '../runs/types';
import { RunWebviewSession, savedRunDir, webviewHtml, webviewOptions } from './session';

export const RUN_PANEL_TYPE = 'qlora.runPanel';
export const OPEN_RUN_PANEL_COMMAND = 'qlora.internal.openRunPanel';

export class RunPanels implements vscode.WebviewPanelSerializer, vscode.Disposable {
  private readonly panels = new Map<string, { panel: vscode.WebviewPanel; session: RunWebviewSession }>();
  private readonly subscription: vscode.Disposable;

  constructor(private readonly extensionUri: vscode.Uri, private readonly runs: RunSource) {
    // A run deleted (Delete Run, or its folder removed) takes its panel along: its buttons would act on nothing.
    this.subscription = runs.onDidChangeRuns(() => {
      for (const [runDir, { panel }] of [...this.panels]) if (!fs.existsSync(path.join(runDir, 'config.json'))) panel.dispose();
    });
  }

  /** Shows the run's panel, creating it if needed; returns it (for tests and callers that want to wait). */
  open(runDir: string): vscode.WebviewPanel {
    const key = path.resolve(runDir);
    const existing = this.panels.get(key);
    if (existing) {
      existing.panel.reveal();
      return existing.panel;
    }
    const panel = vscode.window.createWebviewPanel(RUN_PANEL_TYPE, path.basename(runDir), vscode.ViewColumn.Active, {
      ...webviewOptions(this.extensionUri),
      retainContextWhenHidden: false,
    });
    this.attach(panel, runDir);
    return panel;
  }

  async deserializeWebviewPanel(panel: vscode.WebviewPanel, state: unknown): Promise<void> {
    const runDir = savedRunDir(state);
    // The run was deleted while the window was closed, or the state is not ours: nothing to show.
    if (runDir === undefined || !this.runs.list().some((r) => path.resolve(r.runDir) === path.resolve(runDir))) {
      panel.dispose();
      return;
    }
    if (this.panels.has(path.resolve(runDir))) {
      // Two restored panels for one run: keep the first, the map allows one per run.
      panel.dispose();
      return;
    }
    panel.webview.options = webviewOptions(this.extensionUri);
    this.attach(panel, runDir);
  }

  dispose(): void {
    this.subscription.dispose();
    for (const { panel } of [...this.panels.values()]) panel.dispose();
  }

  private attach(panel: vscode.WebviewPanel, runDir: string): void {
    const key = path.resolve(runDir);
    panel.title = path.basename(runDir);
    panel.iconPath = vscode.Uri.joinPath(this.extensionUri, 'media', 'icon.svg');
    panel.webview.html = webviewHtml(panel.webview, this.extensionUri, `Run ${path.basename(runDir)}`);
    const session = new RunWebviewSession(panel.webview, this.runs, runDir, { followNewRuns: false });
    this.panels.set(key, { panel, session });
    const subscriptions = [
      panel.onDidChangeViewState(() => {
        if (!panel.visible) session.detached();
      }),
    ];
    panel.onDidDispose(() => {
      this.panels.delete(key);
      session.dispose();
      for (const s of subscriptions) s.dispose();
    });
  }
}
