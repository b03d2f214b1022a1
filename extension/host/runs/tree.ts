// The Runs view: one item per run, newest first, with its progress, status icon and a context value the manifest's
// menus match (run-running, run-finished, run-stopped, run-failed). A click opens the run.
import * as vscode from 'vscode';
import { runDescription, runTooltip } from '../format';
import type { RunInfo, RunSource } from './types';

const ICONS: Record<RunInfo['status'], vscode.ThemeIcon> = {
  running: new vscode.ThemeIcon('sync~spin'),
  finished: new vscode.ThemeIcon('pass', new vscode.ThemeColor('testing.iconPassed')),
  stopped: new vscode.ThemeIcon('debug-pause'),
  failed: new vscode.ThemeIcon('error', new vscode.ThemeColor('testing.iconFailed')),
};

export class RunTreeItem extends vscode.TreeItem {
  readonly runDir: string;

  constructor(readonly run: RunInfo) {
    super(run.name, vscode.TreeItemCollapsibleState.None);
    this.runDir = run.runDir;
    this.id = run.runDir;
    this.description = runDescription(run);
    this.tooltip = runTooltip(run);
    this.iconPath = ICONS[run.status];
    this.contextValue = `run-${run.status}`;
    this.resourceUri = vscode.Uri.file(run.runDir);
    this.command = { command: 'qlora.openRun', title: 'Open Run', arguments: [run.runDir] };
  }
}

export class RunsTreeProvider implements vscode.TreeDataProvider<RunTreeItem>, vscode.Disposable {
  private readonly changed = new vscode.EventEmitter<void>();
  readonly onDidChangeTreeData = this.changed.event;
  private readonly subscriptions: vscode.Disposable[] = [];
  // "12m ago" ages: redraw every minute.
  private readonly clock = setInterval(() => this.changed.fire(), 60_000);

  constructor(private readonly runs: RunSource) {
    this.subscriptions.push(runs.onDidChangeRuns(() => this.changed.fire()));
  }

  getTreeItem(item: RunTreeItem): vscode.TreeItem {
    return item;
  }

  getChildren(item?: RunTreeItem): RunTreeItem[] {
    return item ? [] : this.runs.list().map((run) => new RunTreeItem(run));
  }

  dispose(): void {
    clearInterval(this.clock);
    this.changed.dispose();
    for (const s of this.subscriptions) s.dispose();
  }
}

export function createRunsView(runs: RunSource): vscode.Disposable {
  const provider = new RunsTreeProvider(runs);
  const view = vscode.window.createTreeView('qlora.runsView', { treeDataProvider: provider });
  const updateMessage = () => {
    view.message = runs.list().length === 0 ? 'No runs yet. Start one with New Finetune (the rocket above).' : undefined;
  };
  updateMessage();
  const sub = runs.onDidChangeRuns(updateMessage);
  return vscode.Disposable.from(provider, view, sub);
}
