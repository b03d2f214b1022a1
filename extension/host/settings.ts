// The qlora.* settings, read when used (so changes apply without a reload), and what follows from them: the runs
// directory and how to launch the CLI.
import * as path from 'node:path';
import * as vscode from 'vscode';
import { DEVICE_REQUESTS, type DeviceRequest } from '../engine/device';
import type { PresetName } from './newRun';
import type { TrainerLaunch } from './trainerProcess';
import { expandHome } from '../util/homePath';

export interface Settings {
  defaultPreset: PresetName;
  /** These three where the user set them; null: the chosen preset's own value. */
  maxSequenceLength: number | null;
  checkpointEvery: number | null;
  evalEvery: number | null;
  /** Where runs train (qlora.device). */
  device: DeviceRequest;
  /** GiB of GPU memory a run may use; 0 = what is free when it starts, less a margin. */
  gpuMemoryBudget: number;
  huggingFaceCache: string;
  /** Prompts answered at the start and at every eval of a run (qlora.samplePrompts). */
  samplePrompts: string[];
}

export function readSettings(): Settings {
  const c = vscode.workspace.getConfiguration('qlora');
  const preset = c.get<string>('defaultPreset', 'qlora');
  const device = c.get<string>('device', 'auto');
  return {
    defaultPreset: preset === 'quick' ? 'quick' : 'qlora',
    maxSequenceLength: userSetting(c, 'maxSequenceLength'),
    checkpointEvery: userSetting(c, 'checkpointEvery'),
    evalEvery: userSetting(c, 'evalEvery'),
    device: (DEVICE_REQUESTS as readonly string[]).includes(device) ? (device as DeviceRequest) : 'auto',
    gpuMemoryBudget: Math.max(0, c.get<number>('gpuMemoryBudget', 0)),
    huggingFaceCache: pathSetting('huggingFaceCache'),
    samplePrompts: c.get<unknown[]>('samplePrompts', []).filter((p): p is string => typeof p === 'string' && p.trim() !== '').slice(0, 16),
  };
}

/** A number setting the user (or the workspace) set, at any level; null where it was left unset. */
function userSetting(c: vscode.WorkspaceConfiguration, key: string): number | null {
  const i = c.inspect<number>(key);
  const set = [i?.workspaceFolderValue, i?.workspaceValue, i?.globalValue].find((v) => typeof v === 'number' && Number.isFinite(v));
  return set ?? null;
}

/**
 * A setting naming a program, a library folder or a folder to read models from or write runs to, as the user set it.
 * In an untrusted workspace the workspace's own value is ignored (the manifest's restrictedConfigurations): a cloned
 * repository must not choose the executable we run or the library we load.
 */
export function pathSetting(key: 'nodePath' | 'runsDirectory' | 'cudaLibraryPath' | 'huggingFaceCache'): string {
  const c = vscode.workspace.getConfiguration('qlora');
  const value = vscode.workspace.isTrusted ? c.get<string>(key, '') : (c.inspect<string>(key)?.globalValue ?? '');
  return expandHome(value.trim());
}

export function trainerLaunch(context: vscode.ExtensionContext): TrainerLaunch {
  return {
    cliPath: path.join(context.extensionPath, 'dist', 'cli.js'),
    execPath: pathSetting('nodePath') || process.execPath,
  };
}

/** The qlora.runsDirectory setting, else <first workspace folder>/.qlora/runs, else the extension's global storage. */
export function runsDirectory(context: vscode.ExtensionContext): string {
  const setting = pathSetting('runsDirectory');
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  if (setting !== '') return path.resolve(folder ?? context.globalStorageUri.fsPath, setting);
  if (folder) return path.join(folder, '.qlora', 'runs');
  return path.join(context.globalStorageUri.fsPath, 'runs');
}

/** The manifest's description of each preset (package.json is the one place they are written for the UI). */
export function presetDescriptions(context: vscode.ExtensionContext): Record<string, string> {
  const property = (context.extension.packageJSON as { contributes?: { configuration?: { properties?: Record<string, { enum?: string[]; enumDescriptions?: string[] }> } } })
    .contributes?.configuration?.properties?.['qlora.defaultPreset'];
  const out: Record<string, string> = {};
  property?.enum?.forEach((name, i) => (out[name] = property.enumDescriptions?.[i] ?? ''));
  return out;
}
