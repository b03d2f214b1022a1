// One editor panel previewing a dataset (QLoRA: Select Dataset..., and New Finetune after the dataset step). It is
// replaced, not stacked, when another dataset is previewed. No scripts run in it (see html.ts).
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { DatasetReport } from '../../data';
import { makeNonce } from '../panel/html';
import { buildDatasetPreviewHtml } from './html';

export const DATASET_PREVIEW_TYPE = 'qlora.datasetPreview';

export class DatasetPreviewPanel implements vscode.Disposable {
  private panel: vscode.WebviewPanel | undefined;

  show(report: DatasetReport, options: { maxLength: number; modelDir: string | null; preserveFocus: boolean }): void {
    if (!this.panel) {
      this.panel = vscode.window.createWebviewPanel(
        DATASET_PREVIEW_TYPE,
        '',
        { viewColumn: vscode.ViewColumn.Active, preserveFocus: options.preserveFocus },
        { enableScripts: false, localResourceRoots: [] },
      );
      this.panel.onDidDispose(() => (this.panel = undefined));
    } else {
      this.panel.reveal(undefined, options.preserveFocus);
    }
    this.panel.title = `Dataset: ${report.file}`;
    this.panel.webview.html = buildDatasetPreviewHtml(report, {
      nonce: makeNonce(),
      maxLength: options.maxLength,
      modelName: options.modelDir === null ? null : path.basename(options.modelDir),
    });
  }

  dispose(): void {
    this.panel?.dispose();
  }
}
