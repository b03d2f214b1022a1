// While a run trains, the status bar shows its progress ("$(sync~spin) QLoRA 120/500 · loss 1.23 · 850 tok/s");
// a click shows the training panel. When a run ends, a notification says how, with the next useful actions.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { StepEvent } from '../protocol/events';
import { formatLoss, statusBarText } from './format';
import type { RunSource } from './runs/types';

export function createStatusBar(runs: RunSource): vscode.Disposable {
  const item = vscode.window.createStatusBarItem('qlora.training', vscode.StatusBarAlignment.Left, 10);
  item.name = 'QLoRA Training';
  item.command = 'qlora.showTrainingPanel';
  let liveDir: string | undefined;
  let lastStep: StepEvent | undefined;

  const render = () => {
    if (!liveDir) return item.hide();
    item.text = statusBarText(lastStep);
    item.tooltip = `QLoRA Studio: training ${path.basename(liveDir)}${lastStep?.etaSeconds != null ? `, about ${Math.ceil(lastStep.etaSeconds / 60)} min left` : ''}. Click to show the training panel.`;
    item.show();
  };

  const subscriptions = [
    item,
    runs.onDidChangeStatus(({ runDir, status }) => {
      if (status === 'running') {
        liveDir = runDir;
        lastStep = undefined;
      } else if (runDir === liveDir) {
        liveDir = undefined;
      }
      render();
    }),
    runs.onDidReceiveEvent(({ runDir, event }) => {
      if (runDir !== liveDir || event.kind !== 'step') return;
      lastStep = event;
      render();
    }),
  ];
  // this window's trainer, else a run another process trains (a window reloaded under its own run's trainer)
  const active = runs.activeRun() ?? runs.list().find((r) => r.status === 'running');
  if (active) liveDir = active.runDir;
  render();
  return vscode.Disposable.from(...subscriptions);
}

/** A notification when a run finishes, stops or fails, with [Open Run] and the next step. */
export function createRunNotifications(runs: RunSource, output: vscode.OutputChannel): vscode.Disposable {
  return runs.onDidChangeStatus(async ({ runDir, status, message }) => {
    if (status === 'running') return;
    const name = path.basename(runDir);
    const info = runs.list().find((r) => r.runDir === runDir);
    // A run that failed before the trainer wrote its folder (bad inputs) has nothing to open.
    const hasFolder = fs.existsSync(path.join(runDir, 'config.json'));
    // a run another process trains whose folder left the list (deleted, or the runs directory changed): nothing to say
    if (!hasFolder && status !== 'failed') return;
    const open = 'Open Run';
    let answer: string | undefined;
    if (status === 'finished') {
      answer = await vscode.window.showInformationMessage(`Finetune ${name} finished: loss ${formatLoss(info?.loss ?? null)}.`, open, 'Export Adapter');
      if (answer === 'Export Adapter') return void vscode.commands.executeCommand('qlora.exportAdapter', runDir);
    } else if (status === 'stopped') {
      answer = await vscode.window.showInformationMessage(`Finetune ${name} stopped at step ${info?.step ?? '?'}; resume it any time.`, open, 'Resume');
      if (answer === 'Resume') return void vscode.commands.executeCommand('qlora.resumeRun', runDir);
    } else {
      const actions = hasFolder ? [open, 'Show Output'] : ['Show Output'];
      answer = await vscode.window.showErrorMessage(`Finetune ${name} failed: ${message ?? info?.error ?? 'unknown reason'}`, ...actions);
      if (answer === 'Show Output') return output.show(true);
    }
    if (answer === open) void vscode.commands.executeCommand('qlora.openRun', runDir);
  });
}
