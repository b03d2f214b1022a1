// Every qlora.* command of the manifest, as a table of name → handler (like rust-analyzer's createCommands). Each
// works interactively and, given arguments, without asking anything, so scripts and the e2e suite can drive it.
// A failure is shown as one sentence and the command resolves to undefined.
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as vscode from 'vscode';
import type { DatasetReport } from '../data';
import type { ChatSource } from '../protocol/chat';
import { preparingText, type TrainerEvent } from '../protocol/events';
import { INVALID_ROWS_EXIT_CODE } from '../trainer/exitCodes';
import type { EstimateForPlan } from '../trainer/memoryPlan';
import { describeRunLock, liveRunLock, runLockPath, signalableRunLock, type RunLock } from '../trainer/runLock';
import { adapterOutsideRun } from '../trainer/verbs/export';
import { findOnPath } from '../util/findOnPath';
import type { ChatPanels } from './chat/chatPanel';
import { runCliJson } from './cliRunner';
import { DatasetPreviewPanel } from './datasetPreview/panel';
import { doctorMarkdown, type DoctorSummary } from './doctorView';
import { formatMiB } from './format';
import {
  adapterOfRun,
  defaultRunName,
  estimateDeviceArgs,
  estimateShape,
  hostMemoryUse,
  memoryFit,
  modelOfRun,
  normalizeOverrides,
  parseDataError,
  placementArgs,
  runDirOf,
  runNameProblem,
  trainArgs,
  uniqueRunName,
  type FitTarget,
  type PresetName,
} from './newRun';
import { pickDataset, pickModel, pickPreset, pickRun, rememberModel, SELECTED_DATASET, SELECTED_MODEL } from './pickers';
import type { RunRegistry } from './runs/registry';
import { deletionRefusal } from './runs/deletion';
import { pathSetting, presetDescriptions, readSettings, type Settings } from './settings';
import { TrainerBusyError, type ActiveRun, type TrainerLaunch, type TrainerProcess } from './trainerProcess';

export interface NewFinetuneArgs {
  model?: string;
  data?: string;
  preset?: PresetName;
  runName?: string;
  /** Training settings by config name (maxSteps, batchSize, lr, rank, skipInvalid, ...). */
  overrides?: Record<string, unknown>;
}

export type MergeDtype = 'bf16' | 'f16' | 'f32';

/** The export-gguf verb's JSON report, as far as the host reads it. */
export interface GgufExportSummary {
  file: string;
  bytes: number;
  verification: { verified: boolean; maxAbsLogprobDiff: number; top1Agreement: number; problems: string[] } | null;
}

/** The export-ollama verb's JSON report, as far as the host reads it. */
export interface OllamaExportSummary {
  out: string;
  name: string;
  createCommand: string[];
  gguf: GgufExportSummary;
}

/** GGUF types for the picker, the usual choice first. */
const GGUF_TYPES = [
  { type: 'q4_k_m', detail: '4-bit k-quants with llama.cpp\'s Q4_K_M mix: the usual choice for local inference, about 30% of f16' },
  { type: 'q8_0', detail: '8-bit: nearly lossless, about half of f16' },
  { type: 'f16', detail: 'float16: the merged weights as they are, rounded once' },
  { type: 'bf16', detail: 'bfloat16: as f16, for runtimes that prefer it' },
  { type: 'f32', detail: 'float32: exact, twice the size of f16' },
] as const;

export interface HostServices {
  context: vscode.ExtensionContext;
  runs: RunRegistry;
  trainer: TrainerProcess;
  output: vscode.OutputChannel;
  diagnostics: vscode.DiagnosticCollection;
  chats: ChatPanels;
  launch(): TrainerLaunch;
  runsDirectory(): string;
}

/** What the host reads of `inspect-data --json` (the report of extension/data). */
type DatasetPreview = DatasetReport;

type Handler = (...args: unknown[]) => unknown;

const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

/** Examples the dataset check tokenizes for the preview's token statistics (all rows are checked). */
export const PREVIEW_TOKENIZED_EXAMPLES = 20_000;

class Refusal extends Error {}

/** A run that another window or a terminal is training is left to that process. */
function refuseTrainedElsewhere(runDir: string, verb: 'resume' | 'delete'): void {
  const holder = liveRunLock(runDir);
  if (holder) throw new Refusal(`${path.basename(runDir)} is being trained by ${describeRunLock(holder)}; stop it before you ${verb} it (if no such process trains it, delete ${runLockPath(runDir)}).`);
}

/**
 * Stops a run that another process trains as Ctrl-C in its terminal would: SIGINT, after which it saves a checkpoint
 * at the end of its step. Windows has no such signal (Node's kill ends the process outright), so there the first
 * Stop says where to stop it; quitting at once is the second Stop's offer everywhere.
 */
function stopTrainedElsewhere(runDir: string, holder: RunLock): boolean {
  const name = path.basename(runDir);
  if (process.platform === 'win32') {
    void vscode.window.showWarningMessage(`${name} is being trained by ${describeRunLock(holder)}, in another window or a terminal: stop it there (or Stop again here to quit it at once).`);
    return false;
  }
  try {
    process.kill(holder.pid, 'SIGINT');
  } catch (err) {
    void vscode.window.showErrorMessage(`Could not stop ${name} (${describeRunLock(holder)}): ${err instanceof Error ? err.message : String(err)}`);
    return false;
  }
  void vscode.window.showInformationMessage(`${name}: stopping after its current step (it saves a checkpoint).`);
  return true;
}

/**
 * A second Stop of a run that has not stopped yet (a long step on the CPU, or a trainer stuck in one): offers to
 * quit it now, losing the steps since its last checkpoint. True when it was quit.
 */
async function offerToQuit(name: string, quit: () => void): Promise<boolean> {
  const now = 'Quit Now';
  const answer = await vscode.window.showWarningMessage(
    `${name} has not stopped yet: it stops at the end of its current step. Quit it now?`,
    { modal: true, detail: 'The steps since its last checkpoint are lost; the checkpoints and the run folder are kept, and Resume goes on from the last checkpoint.' },
    now,
  );
  if (answer !== now) return false;
  quit();
  return true;
}

/** Files an export or merge left out because they are links leading outside the folder they were in. */
function warnNotCopied(notCopied: readonly string[] | undefined): void {
  if (!notCopied || notCopied.length === 0) return;
  const more = notCopied.length > 3 ? `; and ${notCopied.length - 3} more` : '';
  void vscode.window.showWarningMessage(`${notCopied.slice(0, 3).join('; ')}${more}.`);
}

/**
 * What reads a workspace's models, datasets and runs with the engine or a chat template, writes from them, or signals
 * a process a run folder names, waits for the user's trust: a cloned repository must not choose what is loaded,
 * exported or killed. Runs can still be viewed.
 */
function refuseUntrusted(action: string): void {
  if (!vscode.workspace.isTrusted) throw new Refusal(`QLoRA Studio cannot ${action} in an untrusted workspace (Restricted Mode). Trust the workspace first.`);
}

/** Row errors of the dataset in the Problems panel, at their line (rows without a line: at the top). */
export function showDatasetProblems(diagnostics: vscode.DiagnosticCollection, dataFile: string, report: DatasetPreview): void {
  const uri = vscode.Uri.file(dataFile);
  const items: vscode.Diagnostic[] = [];
  for (const text of report.errors) {
    const at = parseDataError(text);
    const line = at?.line !== undefined ? at.line - 1 : 0;
    const what = at === undefined ? text : at.row !== undefined ? `row ${at.row}: ${at.message}` : at.message;
    const d = new vscode.Diagnostic(new vscode.Range(line, 0, line, Number.MAX_SAFE_INTEGER), what, vscode.DiagnosticSeverity.Error);
    d.source = 'qlora';
    items.push(d);
  }
  if (report.invalidRows > report.errors.length) {
    const more = new vscode.Diagnostic(new vscode.Range(0, 0, 0, 0), `${report.invalidRows - report.errors.length} more invalid rows not listed`, vscode.DiagnosticSeverity.Information);
    more.source = 'qlora';
    items.push(more);
  }
  diagnostics.set(uri, items);
}

export function createCommands(h: HostServices, preview: DatasetPreviewPanel): Record<string, Handler> {
  const { context, runs, trainer } = h;

  /** inspect-data in a child process (the tokenizer loads there, not in the host), with a progress notification. */
  function inspectData(data: string, model: string | undefined, seqLen: number): Thenable<DatasetPreview> {
    // every row is checked; the token statistics of a large dataset come from its first examples
    const args = ['inspect-data', '--data', data, '--seq-len', String(seqLen), '--sample', String(PREVIEW_TOKENIZED_EXAMPLES), ...(model ? ['--model', model] : [])];
    return vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title: `Checking ${path.basename(data)}…` }, () =>
      runCliJson<DatasetPreview>(h.launch(), args, { timeoutMs: 300_000, answerExitCodes: [INVALID_ROWS_EXIT_CODE] }),
    );
  }

  /** Where New Finetune's memory check measures: the GPU `--device` would choose (doctor's answer), else this machine's RAM. */
  async function fitTarget(settings: Settings): Promise<FitTarget> {
    const cpu: FitTarget = { kind: 'cpu', freeBytes: os.freemem() };
    if (settings.device === 'cpu') return cpu;
    const dir = pathSetting('cudaLibraryPath');
    const doctor = await runCliJson<DoctorSummary>(h.launch(), ['doctor', '--json', ...(dir ? ['--cuda-lib-dir', dir] : [])], { timeoutMs: 60_000 });
    const gpu = doctor.gpus.find((g) => g.cudaIndex === 0);
    return doctor.device === 'cuda' && gpu
      ? { kind: 'gpu', name: gpu.name, memoryTotal: gpu.memoryTotal, memoryFree: gpu.memoryFree, budgetGiB: settings.gpuMemoryBudget, computeDtype: doctor.computeDtype }
      : cpu;
  }

  /** Starts the trainer and waits for its run-started event (or its early end: bad inputs end it before that). */
  async function startRun(verb: 'train' | 'resume', runDir: string, args: string[] = []): Promise<string | undefined> {
    let run: ActiveRun;
    try {
      run = trainer.start(verb, runDir, args);
    } catch (err) {
      if (err instanceof TrainerBusyError) throw new Refusal(err.message);
      throw err;
    }
    const started = new Promise<boolean>((resolve) => {
      const sub = trainer.onDidReceiveEvent(({ runDir: dir, event }: { runDir: string; event: TrainerEvent }) => {
        if (dir === runDir && event.kind === 'run-started') {
          sub.dispose();
          resolve(true);
        }
      });
      void run.ended.then(() => {
        sub.dispose();
        resolve(false);
      });
    });
    const ok = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: `${verb === 'train' ? 'Starting' : 'Resuming'} ${path.basename(runDir)}` },
      (progress) => {
        progress.report({ message: 'reading the data…' });
        const sub = trainer.onDidPrepare(({ runDir: dir, preparing }) => {
          if (dir === runDir) progress.report({ message: preparingText(preparing) });
        });
        return started.finally(() => sub.dispose());
      },
    );
    // An early failure has been announced by the run-end notification already.
    return ok ? runDir : undefined;
  }

  async function runArg(arg: unknown, placeHolder: string, statuses?: readonly ('running' | 'finished' | 'stopped' | 'failed')[]): Promise<string | undefined> {
    return runDirOf(arg) ?? (await pickRun(runs.list(), placeHolder, statuses));
  }

  async function newFinetune(args: NewFinetuneArgs = {}): Promise<string | undefined> {
    refuseUntrusted('start training');
    const active = trainer.active;
    if (active) throw new Refusal(`A run is already training (${active.name}); stop it first.`);
    const interactive = !(args.model && args.data && args.preset);
    const settings = readSettings();
    // A bad override is reported before anything runs.
    const overrides: Record<string, unknown> = normalizeOverrides(args.overrides);

    const model = args.model ?? (await pickModel(context));
    if (!model) return undefined;
    const data = args.data ?? (await pickDataset(context));
    if (!data) return undefined;

    // the preview's max length: the run's unless the preset, chosen next, decides it (then the default preset's)
    const previewSeqLen = estimateShape(args.preset ?? settings.defaultPreset, overrides, settings.maxSequenceLength).seqLen;
    const report = await inspectData(data, model, previewSeqLen);
    showDatasetProblems(h.diagnostics, data, report);
    // Shown beside the flow (focus stays in the QuickPick), so the preset is chosen with the data in view.
    if (interactive) preview.show(report, { maxLength: previewSeqLen, modelDir: model, preserveFocus: true });
    const summary = `${path.basename(data)}: ${report.shape ?? 'unknown shape'}, ${report.rowCount.toLocaleString('en-US')} rows, ${report.invalidRows} invalid`;
    if (report.validRows === 0) throw new Refusal(`${summary}: nothing to train on${report.errors[0] ? ` (${report.errors[0]})` : ''}.`);

    const preset = args.preset ?? (interactive ? await pickPreset(presetDescriptions(context), settings.defaultPreset, `${summary}. Choose a preset`) : settings.defaultPreset);
    if (!preset) return undefined;

    if (report.invalidRows > 0 && overrides.skipInvalid !== true && interactive) {
      const skip = 'Skip Invalid Rows';
      const answer = await vscode.window.showWarningMessage(
        `${report.invalidRows} of ${report.rowCount} rows of ${path.basename(data)} are invalid (listed in the Problems panel).`,
        { modal: true, detail: 'Train on the valid rows only, or cancel and fix the file.' },
        skip,
      );
      if (answer !== skip) return undefined;
      overrides.skipInvalid = true;
    }

    const runsDir = h.runsDirectory();
    let name = args.runName;
    if (name !== undefined) {
      const problem = runNameProblem(name, runsDir);
      if (problem) throw new Refusal(problem);
    } else {
      const suggested = uniqueRunName(runsDir, defaultRunName(model, data));
      name = interactive
        ? await vscode.window.showInputBox({ title: 'QLoRA: Run Name', value: suggested, prompt: `A folder in ${runsDir}`, validateInput: (v) => runNameProblem(v, runsDir), ignoreFocusOut: true })
        : suggested;
      if (!name) return undefined;
    }
    const runDir = path.join(runsDir, name);

    if (interactive) {
      const shape = estimateShape(preset, overrides, settings.maxSequenceLength);
      const seqLen = shape.seqLen;
      let memory: string;
      let fits = true;
      try {
        const target = await fitTarget(settings);
        const e = await runCliJson<EstimateForPlan>(
          h.launch(),
          ['estimate', '--model', model, '--seq-len', String(seqLen), '--batch-size', String(shape.batchSize), '--rank', String(shape.rank), '--lora-dropout', String(shape.dropout), ...estimateDeviceArgs(target)],
          { timeoutMs: 60_000 },
        );
        const fit = memoryFit(e, target);
        fits = fit.fits;
        memory =
          `about ${formatMiB(fit.peak)} at peak (rank ${shape.rank}, batch ${shape.batchSize} × ${seqLen} tokens); ` +
          (fit.fits ? `fits in ${fit.limit}${hostMemoryUse(fit)}` : `more than ${fit.limit}: lower qlora.maxSequenceLength or the batch size`);
      } catch (err) {
        memory = `unknown (${message(err)})`;
      }
      const start = fits ? 'Start Training' : 'Start Anyway';
      const detail = { modal: true, detail: [`Model: ${model}`, `Data: ${summary}`, `Preset: ${preset}`, `Memory: ${memory}`, `Run folder: ${runDir}`].join('\n') };
      const answer = fits
        ? await vscode.window.showInformationMessage(`Start finetune "${name}"?`, detail, start)
        : await vscode.window.showWarningMessage(`Finetune "${name}" may not fit in memory. Start it anyway?`, detail, start);
      if (answer !== start) return undefined;
    }

    const cliArgs = [
      ...trainArgs({ model, data, preset, seqLen: settings.maxSequenceLength, checkpointEvery: settings.checkpointEvery, evalEvery: settings.evalEvery, samplePrompts: settings.samplePrompts, overrides }),
      ...placementArgs({ ...settings, cudaLibraryPath: pathSetting('cudaLibraryPath') }),
    ];
    if (interactive) void vscode.commands.executeCommand('qlora.trainingView.focus');
    await rememberModel(context, model);
    return startRun('train', runDir, cliArgs);
  }

  async function resumeRun(arg?: unknown): Promise<string | undefined> {
    refuseUntrusted('resume a run');
    const runDir = await runArg(arg, 'Run to resume', ['stopped', 'failed']);
    if (!runDir) return undefined;
    refuseTrainedElsewhere(runDir, 'resume');
    return startRun('resume', runDir, placementArgs({ ...readSettings(), cudaLibraryPath: pathSetting('cudaLibraryPath') }));
  }

  async function exportAdapter(arg?: unknown, outArg?: unknown): Promise<string | undefined> {
    refuseUntrusted('export an adapter');
    const runDir = await runArg(arg, 'Run whose adapter to export', ['finished', 'stopped']);
    if (!runDir) return undefined;
    let out = typeof outArg === 'string' ? outArg : undefined;
    if (!out) {
      const parent = vscode.workspace.workspaceFolders?.[0]?.uri ?? vscode.Uri.file(path.dirname(runDir));
      const picked = await vscode.window.showSaveDialog({ title: 'Export adapter to a new folder', saveLabel: 'Export', defaultUri: vscode.Uri.joinPath(parent, `${path.basename(runDir)}-adapter`) });
      out = picked?.fsPath;
      if (!out) return undefined;
    }
    const target = out;
    const result = await vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title: `Exporting the adapter of ${path.basename(runDir)}…` }, () =>
      runCliJson<{ from: string; out: string; notCopied?: string[] }>(h.launch(), ['export', '--run', runDir, '--out', target], { timeoutMs: 300_000 }),
    );
    warnNotCopied(result.notCopied);
    void revealNotice(`Exported the adapter of ${path.basename(runDir)} to ${result.out}.`, result.out);
    return result.out;
  }

  async function mergeAndSave(arg?: unknown, outArg?: unknown, dtypeArg?: unknown): Promise<string | undefined> {
    refuseUntrusted('merge a model');
    const runDir = await runArg(arg, 'Run to merge into its base model', ['finished', 'stopped']);
    if (!runDir) return undefined;
    const model = modelOfRun(runDir);
    const adapter = adapterOfRun(runDir);
    if (!adapter) throw new Refusal(`${path.basename(runDir)} has no adapter and no complete checkpoint yet.`);
    // the run's own adapter: a link out of the run folder (which may have come with a cloned repository) is not merged
    const outside = adapterOutsideRun(runDir, adapter);
    if (outside !== null) throw new Refusal(`${outside}.`);
    let dtype: MergeDtype | undefined = dtypeArg === 'bf16' || dtypeArg === 'f16' || dtypeArg === 'f32' ? dtypeArg : undefined;
    if (dtypeArg !== undefined && dtype === undefined) throw new Refusal(`dtype must be bf16, f16 or f32, got ${JSON.stringify(dtypeArg)}.`);
    if (!dtype) {
      const choice = await vscode.window.showQuickPick(
        [
          { label: 'bf16', detail: 'bfloat16: the usual choice, half the size of f32', dtype: 'bf16' as const },
          { label: 'f16', detail: 'float16: for runtimes without bfloat16', dtype: 'f16' as const },
          { label: 'f32', detail: 'float32: exact, twice the size', dtype: 'f32' as const },
        ],
        { title: 'QLoRA: Merged Model Precision' },
      );
      dtype = choice?.dtype;
      if (!dtype) return undefined;
    }
    let out = typeof outArg === 'string' ? outArg : undefined;
    if (!out) {
      const picked = await vscode.window.showSaveDialog({ title: 'Save the merged model to a new folder', saveLabel: 'Merge', defaultUri: vscode.Uri.file(uniqueFolder(path.join(runDir, 'merged'))) });
      out = picked?.fsPath;
      if (!out) return undefined;
    }
    const target = out;
    const chosen = dtype;
    const result = await vscode.window.withProgress(
      { location: vscode.ProgressLocation.Notification, title: `Merging ${path.basename(runDir)} into a ${chosen} model…`, cancellable: true },
      (_progress, token) => {
        const abort = new AbortController();
        token.onCancellationRequested(() => abort.abort());
        return runCliJson<{ out: string; notCopied?: string[] }>(h.launch(), ['merge', '--model', model, '--adapter', adapter, '--out', target, '--dtype', chosen], { signal: abort.signal });
      },
    );
    warnNotCopied(result.notCopied);
    void revealNotice(`Merged ${path.basename(runDir)} into ${result.out}.`, result.out);
    return result.out;
  }

  /** The GGUF type given by a script (checked), else picked by the user; undefined when the pick is dismissed. */
  async function ggufTypeArg(typeArg: unknown, pick: { title: string; placeHolder?: string }): Promise<string | undefined> {
    if (typeof typeArg === 'string') {
      if (GGUF_TYPES.some((t) => t.type === typeArg)) return typeArg;
      throw new Refusal(`type must be one of ${GGUF_TYPES.map((t) => t.type).join(', ')}, got ${JSON.stringify(typeArg)}.`);
    }
    const choice = await vscode.window.showQuickPick(GGUF_TYPES.map((t) => ({ label: t.type, detail: t.detail, type: t.type })), pick);
    return choice?.type;
  }

  /** An export verb under a cancellable progress notification that shows the lines it prints to stderr. */
  function runExportVerb<T>(title: string, args: string[]): Thenable<T> {
    return vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title, cancellable: true }, (progress, token) => {
      const abort = new AbortController();
      token.onCancellationRequested(() => abort.abort());
      return runCliJson<T>(h.launch(), args, {
        signal: abort.signal,
        onStderrLine: (line) => progress.report({ message: line.replace(/\.\.\.$/, '…') }),
      });
    });
  }

  /**
   * The run's merged model as a GGUF for llama.cpp / Ollama / LM Studio, checked in llama.cpp against the engine
   * (export-gguf). Arguments for scripts: (runDir, outFile, type).
   */
  async function exportGgufCommand(arg?: unknown, outArg?: unknown, typeArg?: unknown): Promise<GgufExportSummary | undefined> {
    refuseUntrusted('export to GGUF');
    const runDir = await runArg(arg, 'Run to export as GGUF', ['finished', 'stopped']);
    if (!runDir) return undefined;
    if (!adapterOfRun(runDir)) throw new Refusal(`${path.basename(runDir)} has no adapter and no complete checkpoint yet.`);
    const type = await ggufTypeArg(typeArg, { title: 'QLoRA: GGUF Type', placeHolder: 'How the merged weights are stored' });
    if (!type) return undefined;
    let out = typeof outArg === 'string' ? outArg : undefined;
    if (!out) {
      const parent = vscode.workspace.workspaceFolders?.[0]?.uri ?? vscode.Uri.file(path.dirname(runDir));
      const picked = await vscode.window.showSaveDialog({
        title: 'Export the merged model as GGUF', saveLabel: 'Export', filters: { GGUF: ['gguf'] },
        defaultUri: vscode.Uri.joinPath(parent, `${path.basename(runDir)}-${type}.gguf`),
      });
      out = picked?.fsPath;
      if (!out) return undefined;
    }
    const report = await runExportVerb<GgufExportSummary>(`Exporting ${path.basename(runDir)} as ${type} GGUF`, ['export-gguf', '--run', runDir, '--out', out, '--type', type]);
    const v = report.verification;
    const size = formatMiB(report.bytes);
    if (v?.verified) {
      void revealNotice(
        `Exported ${path.basename(report.file)} (${size}); verified in llama.cpp: max |Δ log-prob| ${v.maxAbsLogprobDiff.toFixed(3)}, top-1 agreement ${(100 * v.top1Agreement).toFixed(1)}%.`,
        report.file,
      );
    } else if (v) {
      h.output.appendLine(`GGUF check of ${report.file} failed: ${v.problems.join('; ')}`);
      const reveal = 'Reveal';
      // not awaited: the command resolves with the report while the warning waits for the user
      void vscode.window
        .showWarningMessage(`${path.basename(report.file)} was written but llama.cpp does not reproduce the model: ${v.problems[0] ?? 'the check failed'}`, reveal)
        .then((answer) => (answer === reveal ? vscode.commands.executeCommand('revealFileInOS', vscode.Uri.file(report.file)) : undefined));
    }
    return report;
  }

  /**
   * The run as an Ollama model folder (model.gguf, checked in llama.cpp, and a Modelfile), then `ollama create` on
   * request when Ollama is installed. Arguments for scripts: (runDir, outFolder, type).
   */
  async function exportOllamaCommand(arg?: unknown, outArg?: unknown, typeArg?: unknown): Promise<OllamaExportSummary | undefined> {
    refuseUntrusted('export for Ollama');
    const runDir = await runArg(arg, 'Run to export for Ollama', ['finished', 'stopped']);
    if (!runDir) return undefined;
    if (!adapterOfRun(runDir)) throw new Refusal(`${path.basename(runDir)} has no adapter and no complete checkpoint yet.`);
    const type = await ggufTypeArg(typeArg, { title: 'QLoRA: GGUF Type for Ollama' });
    if (!type) return undefined;
    let out = typeof outArg === 'string' ? outArg : undefined;
    if (!out) {
      const parent = vscode.workspace.workspaceFolders?.[0]?.uri ?? vscode.Uri.file(path.dirname(runDir));
      const picked = await vscode.window.showSaveDialog({ title: 'Write the Ollama model to a new folder', saveLabel: 'Export', defaultUri: vscode.Uri.file(uniqueFolder(path.join(parent.fsPath, `${path.basename(runDir)}-ollama`))) });
      out = picked?.fsPath;
      if (!out) return undefined;
    }
    const report = await runExportVerb<OllamaExportSummary>(`Exporting ${path.basename(runDir)} for Ollama`, ['export-ollama', '--run', runDir, '--out', out, '--type', type]);
    const command = report.createCommand.map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ');
    h.output.appendLine(`Ollama model written to ${report.out}; import it with: ${command}`);
    const ollama = findOnPath('ollama');
    const create = 'Create in Ollama', copy = 'Copy Command', reveal = 'Reveal';
    // not awaited: the command resolves with the report while the notification waits for the user
    void vscode.window
      .showInformationMessage(
        `Wrote ${path.basename(report.out)} (model.gguf verified in llama.cpp, and a Modelfile). Import it with: ${command}`,
        ...(ollama ? [create] : []), copy, reveal,
      )
      .then(async (answer) => {
        if (answer === copy) await vscode.env.clipboard.writeText(command);
        else if (answer === reveal) await vscode.commands.executeCommand('revealFileInOS', vscode.Uri.file(report.out));
        else if (answer === create && ollama) await ollamaCreate(ollama, report, command);
      })
      .then(undefined, (err: unknown) => void vscode.window.showErrorMessage(`QLoRA Studio: ${message(err)}`));
    return report;
  }

  /** `ollama create` with the export's argument list (no shell), its output in the output channel. */
  async function ollamaCreate(ollama: string, report: OllamaExportSummary, command: string): Promise<void> {
    await vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title: `ollama create ${report.name}` }, () =>
      new Promise<void>((resolve, reject) => {
        execFile(ollama, report.createCommand.slice(1), { windowsHide: true, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
          h.output.appendLine(`${command}\n${stdout}${stderr}`);
          if (err) reject(new Error(`ollama create failed: ${(stderr || err.message).trim().split('\n').pop()}`));
          else resolve();
        });
      }),
    );
    void vscode.window.showInformationMessage(`Created the Ollama model ${report.name}: ollama run ${report.name}`);
  }

  function uniqueFolder(base: string): string {
    let candidate = base;
    for (let i = 2; fs.existsSync(candidate); i++) candidate = `${base}-${i}`;
    return candidate;
  }

  async function revealNotice(text: string, folder: string): Promise<void> {
    const reveal = 'Reveal';
    if ((await vscode.window.showInformationMessage(text, reveal)) === reveal) await vscode.commands.executeCommand('revealFileInOS', vscode.Uri.file(folder));
  }

  /**
   * What Try Model chats with: a run (the argument, or picked among runs with an adapter), optionally one of its
   * checkpoints; or a model folder with or without an adapter folder ({model, adapter} or picked).
   */
  async function chatSource(arg: unknown, checkpointArg: unknown): Promise<ChatSource | undefined> {
    const o = typeof arg === 'object' && arg !== null ? (arg as Record<string, unknown>) : {};
    if (typeof o.model === 'string') return { model: o.model, ...(typeof o.adapter === 'string' ? { adapter: o.adapter } : {}) };
    const checkpoint = typeof checkpointArg === 'number' ? checkpointArg : typeof o.checkpoint === 'number' ? o.checkpoint : undefined;
    const given = runDirOf(arg);
    if (given) return { run: given, ...(checkpoint !== undefined ? { checkpoint } : {}) };

    const tryable = runs.list().filter((r) => r.status === 'finished' || r.status === 'stopped' || adapterOfRun(r.runDir) !== undefined);
    const MODEL = '$(folder) A model folder…';
    const choice = await vscode.window.showQuickPick(
      [
        ...tryable.map((r) => ({ label: r.name, description: r.status, detail: r.runDir, runDir: r.runDir })),
        { label: MODEL, description: 'a base model, with or without a LoRA adapter folder', runDir: undefined },
      ],
      { title: 'QLoRA: Try Model', placeHolder: 'A run to chat with (its base model and its adapter side by side)', ignoreFocusOut: true },
    );
    if (!choice) return undefined;
    if (choice.runDir) return { run: choice.runDir };
    const model = await pickModel(context);
    if (!model) return undefined;
    const adapterChoice = await vscode.window.showQuickPick(['Base model only', 'Choose a LoRA adapter folder…'], { title: 'QLoRA: Try Model', placeHolder: 'Compare with an adapter?', ignoreFocusOut: true });
    if (!adapterChoice) return undefined;
    if (adapterChoice === 'Base model only') return { model };
    const picked = await vscode.window.showOpenDialog({ title: 'A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)', canSelectFolders: true, canSelectFiles: false, openLabel: 'Use Adapter' });
    if (!picked?.[0]) return undefined;
    return { model, adapter: picked[0].fsPath };
  }

  async function tryModel(arg?: unknown, checkpointArg?: unknown): Promise<string | undefined> {
    refuseUntrusted('load a model to try');
    const source = await chatSource(arg, checkpointArg);
    if (!source) return undefined;
    const panel = h.chats.open(source);
    return panel.title;
  }

  async function deleteRun(arg?: unknown, confirmed?: unknown): Promise<boolean> {
    refuseUntrusted('delete a run');
    const runDir = await runArg(arg, 'Run to delete', ['finished', 'stopped', 'failed']);
    if (!runDir) return false;
    const active = trainer.active;
    if (active && path.resolve(active.runDir) === path.resolve(runDir)) throw new Refusal(`${active.name} is training; stop it before deleting it.`);
    refuseTrainedElsewhere(runDir, 'delete');
    const refusal = deletionRefusal(runDir, runs.runsDirectory(), (vscode.workspace.workspaceFolders ?? []).map((f) => f.uri.fsPath));
    if (refusal !== null) throw new Refusal(refusal);
    const real = fs.realpathSync(runDir);
    const where = real === path.resolve(runDir) ? '' : `\n(through a link, at ${real})`;
    if (confirmed !== true) {
      const remove = 'Delete';
      const answer = await vscode.window.showWarningMessage(
        `Delete run "${path.basename(runDir)}"?`,
        { modal: true, detail: `Its folder, checkpoints and adapter are removed from disk:\n${runDir}${where}` },
        remove,
      );
      if (answer !== remove) return false;
    }
    await fs.promises.rm(runDir, { recursive: true, force: true });
    runs.refresh();
    return true;
  }

  // trainers asked to stop already: a second Stop offers to quit them at once
  const stopsAsked = new WeakSet<object>();
  const stopsAskedElsewhere = new Set<string>();

  const table: Record<string, Handler> = {
    'qlora.newFinetune': (args) => newFinetune((args ?? {}) as NewFinetuneArgs),
    'qlora.selectModel': async () => {
      const dir = await pickModel(context);
      if (dir) await context.workspaceState.update(SELECTED_MODEL, dir);
      return dir;
    },
    // Picks (or takes) a dataset, then previews it with the selected model's tokenizer when one is selected.
    'qlora.selectDataset': async (arg) => {
      refuseUntrusted('check a dataset');
      const file = typeof arg === 'string' && arg !== '' ? arg : await pickDataset(context);
      if (!file) return undefined;
      await context.workspaceState.update(SELECTED_DATASET, file);
      const selected = context.workspaceState.get<string>(SELECTED_MODEL);
      const model = selected && fs.existsSync(selected) ? selected : undefined;
      const settings = readSettings();
      const seqLen = estimateShape(settings.defaultPreset, {}, settings.maxSequenceLength).seqLen;
      const report = await inspectData(file, model, seqLen);
      showDatasetProblems(h.diagnostics, file, report);
      preview.show(report, { maxLength: seqLen, modelDir: model ?? null, preserveFocus: false });
      return file;
    },
    'qlora.stopTraining': async (arg) => {
      const runDir = runDirOf(arg);
      const active = trainer.active;
      if (runDir === undefined || (active && path.resolve(active.runDir) === path.resolve(runDir))) {
        if (active && stopsAsked.has(active)) return offerToQuit(active.name, () => trainer.kill());
        if (trainer.stop()) {
          if (active) stopsAsked.add(active);
          return true;
        }
      } else {
        const holder = liveRunLock(runDir);
        if (holder) {
          refuseUntrusted('stop a training process it did not start');
          if (signalableRunLock(runDir) === null)
            throw new Refusal(`${runLockPath(runDir)} names ${describeRunLock(holder)}, which is not a QLoRA Studio trainer, so it was not signalled (if no trainer runs, delete that file).`);
          const key = `${holder.pid} ${holder.started}`;
          if (stopsAskedElsewhere.has(key)) {
            return offerToQuit(path.basename(runDir), () => {
              // the dialog may have stood open while the trainer ended and its pid went to another process
              const still = signalableRunLock(runDir);
              if (still?.pid === holder.pid && still.started === holder.started) process.kill(holder.pid, 'SIGKILL');
            });
          }
          stopsAskedElsewhere.add(key);
          return stopTrainedElsewhere(runDir, holder);
        }
      }
      void vscode.window.showInformationMessage(runDir === undefined ? 'No run is training.' : `${path.basename(runDir)} is not training.`);
      return false;
    },
    'qlora.resumeRun': (arg) => resumeRun(arg),
    'qlora.exportAdapter': (arg, out) => exportAdapter(arg, out),
    'qlora.mergeAndSave': (arg, out, dtype) => mergeAndSave(arg, out, dtype),
    'qlora.exportGguf': (arg, out, type) => exportGgufCommand(arg, out, type),
    'qlora.exportOllama': (arg, out, type) => exportOllamaCommand(arg, out, type),
    'qlora.openRun': async (arg) => {
      const runDir = await runArg(arg, 'Run to open');
      if (runDir) await vscode.commands.executeCommand('qlora.internal.openRunPanel', runDir);
      return runDir;
    },
    'qlora.showTrainingPanel': () => vscode.commands.executeCommand('qlora.trainingView.focus'),
    'qlora.revealRun': async (arg) => {
      const runDir = await runArg(arg, 'Run to reveal');
      if (runDir) await vscode.commands.executeCommand('revealFileInOS', vscode.Uri.file(runDir));
      return runDir;
    },
    'qlora.tryModel': (arg, checkpoint) => tryModel(arg, checkpoint),
    'qlora.deleteRun': (arg, confirmed) => deleteRun(arg, confirmed),
    'qlora.refreshRuns': () => runs.refresh(),
    'qlora.checkGpuSetup': async () => {
      const dir = pathSetting('cudaLibraryPath');
      const args = ['doctor', '--json', ...(dir ? ['--cuda-lib-dir', dir] : [])];
      const report = await vscode.window.withProgress({ location: vscode.ProgressLocation.Notification, title: 'Checking the GPU setup…' }, () =>
        runCliJson<DoctorSummary>(h.launch(), args, { timeoutMs: 60_000 }),
      );
      const doc = await vscode.workspace.openTextDocument({ language: 'markdown', content: doctorMarkdown(report) });
      await vscode.window.showTextDocument(doc, { preview: true });
      const summary = report.device === 'cuda' ? `Training will use ${report.gpus.find((g) => g.cudaIndex === 0)?.name ?? 'the GPU'} (${report.computeDtype}).` : `Training will run on the CPU: ${report.problems.length} problem${report.problems.length === 1 ? '' : 's'} found.`;
      void (report.device === 'cuda' ? vscode.window.showInformationMessage(summary) : vscode.window.showWarningMessage(summary));
      return report;
    },
    'qlora.showEngineInfo': async () => {
      const info = await runCliJson<{ version: string; backends: string[]; threads: number }>(h.launch(), ['engine-info'], { timeoutMs: 60_000 });
      void vscode.window.showInformationMessage(`QLoRA engine ${info.version}: backends ${info.backends.join(', ')}, ${info.threads} CPU threads.`);
      return info;
    },
  };
  return table;
}

export function registerCommands(h: HostServices): vscode.Disposable[] {
  const preview = new DatasetPreviewPanel();
  const commands = Object.entries(createCommands(h, preview)).map(([name, handler]) =>
    vscode.commands.registerCommand(name, async (...args: unknown[]) => {
      try {
        return await handler(...args);
      } catch (err) {
        if (err instanceof Refusal) void vscode.window.showWarningMessage(err.message);
        else {
          h.output.appendLine(`${name} failed: ${err instanceof Error && err.stack ? err.stack : message(err)}`);
          void vscode.window.showErrorMessage(`QLoRA Studio: ${message(err)}`);
        }
        return undefined;
      }
    }),
  );
  return [preview, ...commands];
}
