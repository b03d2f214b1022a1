// The QuickPicks: a model (recent, workspace, Hugging Face cache, browse), a dataset (workspace files, browse), a
// preset and a run. Each returns undefined when dismissed.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vscode from 'vscode';
import { formatBytes, runDescription } from './format';
import { describeModelFolder, huggingFaceHubDirectory, isModelFolder, listHubSnapshots, type ModelDescription } from './models';
import { isLikelyDatasetFile, PRESET_NAMES, type PresetName } from './newRun';
import type { RunInfo } from './runs/types';
import { readSettings } from './settings';

const RECENT_MODELS = 'qlora.recentModels';
export const SELECTED_MODEL = 'qlora.selectedModel';
export const SELECTED_DATASET = 'qlora.selectedDataset';
const BROWSE = '$(folder-opened) Browse...';

interface PathItem extends vscode.QuickPickItem {
  path?: string;
}

const separator = (label: string): PathItem => ({ label, kind: vscode.QuickPickItemKind.Separator });

function modelItem(m: ModelDescription): PathItem {
  return { label: m.name, description: `${m.architecture} · ${formatBytes(m.bytes)}${m.fourBit ? ' · 4-bit' : ''}`, detail: m.dir, path: m.dir };
}

export function rememberModel(context: vscode.ExtensionContext, dir: string): Thenable<void> {
  const recent = context.globalState.get<string[]>(RECENT_MODELS, []).filter((p) => p !== dir);
  return context.globalState.update(RECENT_MODELS, [dir, ...recent].slice(0, 5));
}

async function modelItems(context: vscode.ExtensionContext): Promise<PathItem[]> {
  const seen = new Set<string>();
  const section = (title: string, models: (ModelDescription | undefined)[]): PathItem[] => {
    const fresh = models.filter((m): m is ModelDescription => m !== undefined && !seen.has(m.dir));
    fresh.forEach((m) => seen.add(m.dir));
    return fresh.length ? [separator(title), ...fresh.map(modelItem)] : [];
  };
  const selected = context.workspaceState.get<string>(SELECTED_MODEL);
  const recent = context.globalState.get<string[]>(RECENT_MODELS, []);
  const configs = await vscode.workspace.findFiles('**/config.json', '**/node_modules/**', 50);
  const workspace = configs.map((uri) => path.dirname(uri.fsPath)).filter(isModelFolder).map((dir) => describeModelFolder(dir));
  const cache = listHubSnapshots(huggingFaceHubDirectory(readSettings().huggingFaceCache));
  return [
    ...section('Selected', selected ? [describeModelFolder(selected)] : []),
    ...section('Recently used', recent.map((dir) => describeModelFolder(dir))),
    ...section('Workspace', workspace),
    ...section('Hugging Face cache', cache),
    separator(''),
    { label: BROWSE, description: 'a folder with config.json and *.safetensors' },
  ];
}

export async function pickModel(context: vscode.ExtensionContext): Promise<string | undefined> {
  const choice = await vscode.window.showQuickPick(modelItems(context), {
    title: 'QLoRA: Select Model',
    placeHolder: 'A Hugging Face model folder (plain or bnb-4bit)',
    matchOnDescription: true,
    matchOnDetail: true,
    ignoreFocusOut: true,
  });
  if (!choice) return undefined;
  if (choice.path) return choice.path;
  const picked = await vscode.window.showOpenDialog({ canSelectFolders: true, canSelectFiles: false, canSelectMany: false, openLabel: 'Use Model', title: 'Model folder' });
  const dir = picked?.[0]?.fsPath;
  if (!dir) return undefined;
  if (!isModelFolder(dir)) {
    void vscode.window.showErrorMessage(`${dir} is not a model folder: it needs config.json and *.safetensors weights.`);
    return undefined;
  }
  return dir;
}

async function datasetItems(context: vscode.ExtensionContext): Promise<PathItem[]> {
  const selected = context.workspaceState.get<string>(SELECTED_DATASET);
  const files = await vscode.workspace.findFiles('**/*.{jsonl,json,csv,parquet}', '{**/node_modules/**,**/.git/**,**/.qlora/**}', 500);
  const item = (file: string): PathItem => {
    let size = '';
    try {
      size = formatBytes(fs.statSync(file).size);
    } catch {
      // listed anyway; reading it will say what is wrong
    }
    return { label: path.basename(file), description: [vscode.workspace.asRelativePath(path.dirname(file)), size].filter(Boolean).join(' · '), path: file };
  };
  const workspace = files.map((u) => u.fsPath).filter((f) => isLikelyDatasetFile(f) && f !== selected).sort();
  return [
    ...(selected && fs.existsSync(selected) ? [separator('Selected'), item(selected)] : []),
    ...(workspace.length ? [separator('Workspace'), ...workspace.map(item)] : []),
    separator(''),
    { label: BROWSE, description: '.jsonl, .json, .csv or .parquet' },
  ];
}

export async function pickDataset(context: vscode.ExtensionContext): Promise<string | undefined> {
  const choice = await vscode.window.showQuickPick(datasetItems(context), {
    title: 'QLoRA: Select Dataset',
    placeHolder: 'Training data: chat messages, ShareGPT, Alpaca, completion or plain text',
    matchOnDescription: true,
    ignoreFocusOut: true,
  });
  if (!choice) return undefined;
  if (choice.path) return choice.path;
  const picked = await vscode.window.showOpenDialog({
    canSelectFiles: true,
    canSelectFolders: false,
    canSelectMany: false,
    openLabel: 'Use Dataset',
    filters: { Datasets: ['jsonl', 'json', 'csv', 'parquet'] },
  });
  return picked?.[0]?.fsPath;
}

export async function pickPreset(descriptions: Record<string, string>, preferred: PresetName, placeHolder: string): Promise<PresetName | undefined> {
  const order = [preferred, ...PRESET_NAMES.filter((p) => p !== preferred)];
  const choice = await vscode.window.showQuickPick(
    order.map((name) => ({ label: name, description: name === preferred ? 'default' : undefined, detail: descriptions[name], name })),
    { title: 'QLoRA: Preset', placeHolder, ignoreFocusOut: true },
  );
  return choice?.name;
}

export async function pickRun(runs: readonly RunInfo[], placeHolder: string, statuses?: readonly RunInfo['status'][]): Promise<string | undefined> {
  const candidates = statuses ? runs.filter((r) => statuses.includes(r.status)) : runs;
  if (candidates.length === 0) {
    void vscode.window.showInformationMessage(statuses ? `No ${statuses.join(' or ')} runs.` : 'No runs yet. Start one with "QLoRA: New Finetune...".');
    return undefined;
  }
  const choice = await vscode.window.showQuickPick(
    candidates.map((r) => ({ label: r.name, description: `${r.status} · ${runDescription(r)}`, detail: r.runDir, runDir: r.runDir })),
    { title: 'QLoRA: Run', placeHolder, matchOnDetail: true },
  );
  return choice?.runDir;
}
