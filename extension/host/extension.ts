// The VS Code side: runs registry, trainer process manager, commands, the Runs view, the status bar. Activation is
// light; the host never loads the native engine: anything that needs it runs the qlora-studio CLI (the same code as
// the trainer process) as a child process, so a native crash cannot take the editor down.
import * as path from 'node:path';
import * as vscode from 'vscode';
import { ChatPanels, type ChatPanelInfo } from './chat/chatPanel';
import { registerCommands } from './commands';
import { registerTrainingPanels } from './panel';
import { RunRegistry } from './runs/registry';
import { createRunsView } from './runs/tree';
import type { RunSource } from './runs/types';
import { chatPlacementArgs } from './newRun';
import { pathSetting, readSettings, runsDirectory, trainerLaunch } from './settings';
import { createRunNotifications, createStatusBar } from './statusBar';
import { TrainerProcess } from './trainerProcess';

/** What activate() returns: for the e2e suite and other extensions. */
export interface QloraApi {
  runs: RunSource;
  runsDirectory(): string;
  /** The open chat panels and their server processes. */
  chats(): ChatPanelInfo[];
}

let trainer: TrainerProcess | undefined;

/** Watches run folders appear, change and go (runs the CLI creates included); the registry debounces. */
function watchRunsDirectory(dir: string, onChange: () => void): vscode.Disposable {
  const files = '{*,*/config.json,*/events.jsonl,*/trainer.lock,*/checkpoints/*/DONE}';
  // Inside a workspace folder, a workspace-relative pattern rides on the workspace's own watcher.
  const inside = (root: string) => {
    const rel = path.relative(root, dir);
    return !rel.startsWith('..') && !path.isAbsolute(rel);
  };
  const folder = vscode.workspace.workspaceFolders?.find((f) => inside(f.uri.fsPath));
  const rel = folder ? path.relative(folder.uri.fsPath, dir).split(path.sep).join('/') : '';
  const pattern = folder
    ? new vscode.RelativePattern(folder, rel === '' ? files : `${rel}/${files}`)
    : new vscode.RelativePattern(vscode.Uri.file(dir), files);
  const watcher = vscode.workspace.createFileSystemWatcher(pattern);
  return vscode.Disposable.from(watcher, watcher.onDidCreate(onChange), watcher.onDidChange(onChange), watcher.onDidDelete(onChange));
}

export function activate(context: vscode.ExtensionContext): QloraApi {
  const output = vscode.window.createOutputChannel('QLoRA Studio');
  const launch = () => trainerLaunch(context);
  const runsDir = () => runsDirectory(context);
  trainer = new TrainerProcess(launch, output);
  const runs = new RunRegistry(trainer, runsDir);
  const diagnostics = vscode.languages.createDiagnosticCollection('qlora');
  const chats = new ChatPanels(context.extensionUri, launch, output, () => chatPlacementArgs({ ...readSettings(), cudaLibraryPath: pathSetting('cudaLibraryPath') }));

  let watcher = watchRunsDirectory(runsDir(), () => runs.scheduleRefresh());
  // Beside the watcher, a look every 10 s while the window has focus: a run a terminal starts shows up even where
  // the watcher misses new folders (seen with code-server's); nothing is redrawn unless something changed.
  const recheck = setInterval(() => {
    if (vscode.window.state.focused) runs.refreshIfChanged();
  }, 10_000);
  const rewatch = () => {
    watcher.dispose();
    watcher = watchRunsDirectory(runsDir(), () => runs.scheduleRefresh());
    runs.refresh();
  };

  context.subscriptions.push(
    output,
    diagnostics,
    trainer,
    runs,
    { dispose: () => watcher.dispose() },
    { dispose: () => clearInterval(recheck) },
    chats,
    ...registerCommands({ context, runs, trainer, output, diagnostics, chats, launch, runsDirectory: runsDir }),
    ...registerTrainingPanels(context, runs),
    createRunsView(runs),
    createStatusBar(runs),
    createRunNotifications(runs, output),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration('qlora.runsDirectory')) rewatch();
    }),
    vscode.workspace.onDidChangeWorkspaceFolders(rewatch),
    vscode.workspace.onDidGrantWorkspaceTrust(rewatch),
  );
  return { runs, runsDirectory: runsDir, chats: () => chats.list() };
}

/** Stops a live run cleanly: it saves a checkpoint and exits, within 3 s or, when its step takes longer, on its own. */
export async function deactivate(): Promise<void> {
  await trainer?.shutdown(3000);
}
