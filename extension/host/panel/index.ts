// The training webviews' registration, called once from activate(): the side bar's Training view, the run editor
// panels with their serializer, and the internal command that opens a run's panel.
import * as vscode from 'vscode';
import type { RunSource } from '../runs/types';
import { OPEN_RUN_PANEL_COMMAND, RUN_PANEL_TYPE, RunPanels } from './runPanel';
import { TRAINING_VIEW_ID, TrainingViewProvider } from './trainingView';

export { OPEN_RUN_PANEL_COMMAND, RUN_PANEL_TYPE, TRAINING_VIEW_ID };

export function registerTrainingPanels(context: vscode.ExtensionContext, runs: RunSource): vscode.Disposable[] {
  const view = new TrainingViewProvider(context.extensionUri, runs);
  const panels = new RunPanels(context.extensionUri, runs);
  return [
    view,
    panels,
    vscode.window.registerWebviewViewProvider(TRAINING_VIEW_ID, view),
    vscode.window.registerWebviewPanelSerializer(RUN_PANEL_TYPE, panels),
    vscode.commands.registerCommand(OPEN_RUN_PANEL_COMMAND, (runDir: unknown) => {
      if (typeof runDir !== 'string' || runDir === '') throw new Error(`${OPEN_RUN_PANEL_COMMAND} needs a run folder path`);
      panels.open(runDir);
    }),
  ];
}
