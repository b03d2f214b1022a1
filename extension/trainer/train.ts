// The training loop: config → data → model + LoRA → steps (micro-batches, gradient accumulation, schedule,
// clipping) → eval, checkpoints, events → the PEFT adapter. The run directory is the source of truth: config.json,
// events.jsonl, checkpoints/step-N/, adapter/. `resume` continues from the newest complete checkpoint and, since
// data order and dropout follow from (seed, step), computes exactly what the uninterrupted run would have.
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { EngineError, EngineModel, gpuTelemetry, readModelConfig } from '../engine';
import { TokenizationStopped } from '../data';
import { estimateMemory } from '../engine/tools';
import { writeJsonAtomic } from '../util/atomicFile';
import { removeFolderAtomic, replaceFolderAtomic } from '../util/atomicFolder';
import { assertNewRunFolder, assertRunFolder } from './runFolder';
import { BatchSchedule, evalMicroBatches, makeMicroBatch, type BatchLayout, type TrainExample } from './batches';
import { latestCheckpoint, pruneCheckpoints, readTrainerState, writeCheckpoint, type TrainerState } from './checkpoints';
import { DEFAULT_LOSS_SCALER, LossScaler } from './lossScaler';
import type { TrainConfig } from './config';
import { epochOrder, prepareData, saveTokenCache, type PreparedData } from './data';
import { TOKEN_CACHE_DIR } from './tokenCache';
import { EventLog, sendToHost } from './eventLog';
import { TrainingSamples } from './samples';
import type { PreparingMessage, TrainerEvent } from '../protocol/events';
import { GpuMonitor, type GpuSource } from './gpuTelemetry';
import type { MemoryPlan } from './memoryPlan';
import { checkMemory, engineOptions, placeRun, runDevice, type Placement, type PlacementOptions } from './placement';
import { claimRunLock, type RunLockHandle } from './runLock';
import { learningRate, warmupWarning, type Schedule } from './schedule';
import { readJsonFile } from '../util/jsonFile';

export class TrainingError extends Error {
  override readonly name = 'TrainingError';
}

/** Requests that arrive while training runs (IPC control messages, SIGINT/SIGTERM). */
export class TrainingControl {
  private stop = false;
  private readonly preparation = new AbortController();
  saveRequested = false;
  /** Set once the steps begin (a stop before then ends the run before its first step). */
  training = false;

  /** A stop asked for: after the current step, or, before the run's first step, as soon as the data allows. */
  get stopRequested(): boolean {
    return this.stop;
  }
  set stopRequested(value: boolean) {
    this.stop = value;
    if (value) this.preparation.abort();
  }

  /** Aborted by a stop: tokenizing the data ends early. */
  get preparationSignal(): AbortSignal {
    return this.preparation.signal;
  }
}

export interface TrainOptions {
  runDir: string;
  /** For a new run; a resumed run reads <run>/config.json. */
  config?: TrainConfig;
  resume: boolean;
  control?: TrainingControl;
  /** Sees every event as it is written (terminal progress, tests). */
  onEvent?: (event: TrainerEvent) => void;
  /** Sees what the trainer prepares before the run starts (sent to the host too). */
  onPreparing?: (message: PreparingMessage) => void;
  /** Where to train and under which memory budget (default: --device auto, the GPU's free memory less a margin). */
  placement?: PlacementOptions;
  /** GPU telemetry on a GPU run (default: NVML); tests pass their own. */
  gpuSource?: GpuSource;
}

export interface TrainOutcome {
  status: 'completed' | 'stopped';
  step: number;
  totalSteps: number;
  adapterPath: string | null;
  finalLoss: number | null;
  runDir: string;
  /** Stopped before the first step (while the data or model was prepared): nothing was written or changed. */
  beforeStart?: true;
}

function configDigest(config: TrainConfig): string {
  return createHash('sha256').update(JSON.stringify(config)).digest('hex').slice(0, 16);
}

/**
 * Identifies what the run trains on: every example's token ids and labels, train and eval. The same settings read
 * from an edited data file, or through a model folder whose tokenizer or chat template changed, give another.
 */
function dataDigest(train: readonly TrainExample[], evalSet: readonly TrainExample[]): string {
  const hash = createHash('sha256');
  for (const set of [train, evalSet]) {
    hash.update(`${set.length};`);
    for (const e of set) {
      hash.update(new Uint8Array(e.ids.buffer, e.ids.byteOffset, e.ids.byteLength));
      hash.update(new Uint8Array(e.labels.buffer, e.labels.byteOffset, e.labels.byteLength));
    }
  }
  return hash.digest('hex').slice(0, 16);
}

function readRunConfig(runDir: string): TrainConfig {
  assertRunFolder(runDir, (m) => new TrainingError(m));
  return readJsonFile(path.join(runDir, 'config.json')) as TrainConfig;
}

// A new run never overwrites another, nor writes into a model or any other folder with files in it.
function assertNoRunIn(runDir: string): void {
  assertNewRunFolder(runDir, (m) => new TrainingError(m));
}

// Absolute paths, so that resume works from any working directory.
function absolutePaths(config: TrainConfig): TrainConfig {
  return { ...config, model: path.resolve(config.model), data: path.resolve(config.data), evalData: config.evalData ? path.resolve(config.evalData) : null };
}

/**
 * The loss over every eval example, a micro-batch at a time (evalMicroBatches); null when a stop asked for meanwhile
 * ended it (heard between micro-batches: an eval of a large split takes minutes, and a stop must not wait for it).
 */
async function evaluate(model: EngineModel, examples: readonly TrainExample[], batchSize: number, padId: number, control: TrainingControl): Promise<{ loss: number; tokens: number } | null> {
  let lossSum = 0;
  let tokens = 0;
  for (const group of evalMicroBatches(examples, batchSize)) {
    await yieldToEventLoop();
    if (control.stopRequested) return null;
    const mb = makeMicroBatch(group, padId);
    const r = model.run({ ids: mb.ids, labels: mb.labels, batch: mb.batch, seq: mb.seq });
    lossSum += r.lossSum;
    tokens += r.labelled;
  }
  return { loss: tokens > 0 ? lossSum / tokens : NaN, tokens };
}

function saveFinalAdapter(runDir: string, model: EngineModel, baseModel: string): string {
  const finalDir = path.join(runDir, 'adapter');
  replaceFolderAtomic(finalDir, (tmp) => model.saveAdapter(tmp, baseModel));
  return finalDir;
}

const yieldToEventLoop = () => new Promise<void>((resolve) => setImmediate(resolve));

/** A resumed run on the GPU computes in the dtype its checkpoint was computed in, unless --dtype was given or the GPU
 * lacks it (bf16 before Ampere: then the GPU's own, with a warning). */
function keepSavedDtype(runDir: string, resume: boolean, asked: PlacementOptions, placement: Placement): Placement {
  if (!resume || asked.computeDtype !== undefined || placement.device.kind !== 'cuda') return placement;
  const checkpoint = latestCheckpoint(runDir);
  const saved = checkpoint ? readTrainerState(checkpoint.dir).computeDtype : undefined;
  if (saved === undefined || saved === placement.device.computeDtype) return placement;
  if (saved === 'bf16' && placement.device.computeDtype !== 'bf16') {
    const warning = `the run was computed in bf16 so far; ${placement.device.name} has no bf16, so it goes on in ${placement.device.computeDtype}`;
    return { ...placement, warnings: [...placement.warnings, warning] };
  }
  return { ...placement, device: { ...placement.device, computeDtype: saved } };
}

export async function train(options: TrainOptions): Promise<TrainOutcome> {
  // trainer.lock: from the moment the folder is this run's until the trainer ends, however it ends short of a kill
  let lock: RunLockHandle | undefined;
  const claim = () => {
    lock = claimRunLock(options.runDir, (message) => new TrainingError(message));
  };
  try {
    return await trainClaimed(options, claim, () => lock?.heartbeat());
  } finally {
    lock?.release();
  }
}

async function trainClaimed(options: TrainOptions, claimRunFolder: () => void, heartbeat: () => void): Promise<TrainOutcome> {
  const { runDir, resume } = options;
  const control = options.control ?? new TrainingControl();
  // The device first: `--device cuda` on a machine that cannot is the first thing to hear about. A resumed run keeps
  // the compute dtype it was trained in on the GPU (unless --dtype says otherwise), so that it computes what the
  // uninterrupted run would have.
  const placement = keepSavedDtype(runDir, resume, options.placement ?? {}, placeRun(options.placement ?? {}));
  let config: TrainConfig;
  if (resume) {
    config = readRunConfig(runDir);
    claimRunFolder(); // before the long part (data, model), so that a run being trained is refused at once
    // the run's settings are fixed (a changed config.json is refused below), so its files must be where they were
    for (const [file, what] of [[config.data, 'training data'], [config.evalData, 'eval data'], [config.model, 'base model']] as const) {
      if (typeof file === 'string' && !fs.existsSync(file))
        throw new TrainingError(`${file}: the run's ${what} is not there any more; resume reads it from where the run started (${path.join(runDir, 'config.json')}), so put it back there (a link to it will do)`);
    }
  } else {
    if (!options.config) throw new TrainingError('no configuration for a new run');
    assertNoRunIn(runDir);
    config = absolutePaths(options.config);
  }
  // Everything that can be wrong with the inputs (data rows, model files) is found before the run folder is
  // written, so a bad input leaves nothing behind.
  readModelConfig(config.model); // the model folder first: "no config.json" says more than a missing tokenizer
  // The engine's estimate of what a step holds, by category; under a budget it decides, before anything runs,
  // whether the optimizer pages and whether the run fits at all.
  const estimate = estimateMemory(config.model, {
    batch: config.batchSize, seq: config.seqLen, rank: config.rank, targets: config.targets, quantize: config.quantize,
    gradientCheckpointing: config.gradientCheckpointing, loraDropout: config.dropout, device: placement.device.kind,
    computeDtype: engineOptions(placement).computeDtype,
  });
  let plan: MemoryPlan | null;
  try {
    plan = checkMemory(estimate, placement, config);
  } catch (err) {
    throw new TrainingError(err instanceof Error ? err.message : String(err));
  }
  const offloadedBytes = (plan?.offloadBlockInputs ?? 0) * estimate.activationPageBytes;
  const preparing = (stage: PreparingMessage['stage'], done: number | null, total: number | null) => {
    const message: PreparingMessage = { kind: 'preparing', stage, done, total };
    sendToHost(message);
    options.onPreparing?.(message);
  };
  // A stop before the first step, while the data or the model is prepared: a new run leaves nothing behind (its
  // folder is not written yet), a resumed one is left as it was.
  const stoppedBeforeStart = (): TrainOutcome => {
    const step = resume ? (latestCheckpoint(runDir)?.step ?? 0) : 0;
    // no log to append to (a new run has no folder yet): the host hears how the run ended over IPC alone
    sendToHost({ kind: 'finished', time: new Date().toISOString(), status: 'stopped', step, adapterPath: null, finalLoss: null, elapsedSeconds: 0 } satisfies TrainerEvent);
    return { status: 'stopped', step, totalSteps: 0, adapterPath: null, finalLoss: null, runDir, beforeStart: true };
  };
  let data: PreparedData;
  try {
    data = await prepareData(config, { onProgress: (done, total) => preparing('data', done, total), signal: control.preparationSignal, runDir });
  } catch (err) {
    if (err instanceof TokenizationStopped) return stoppedBeforeStart();
    throw err;
  }
  preparing('model', null, null);
  const model = EngineModel.load(config.model, { quantize: config.quantize, ...engineOptions(placement) });
  await yieldToEventLoop(); // a signal or stop message that came while the model loaded is heard here
  if (control.stopRequested) {
    model.dispose();
    return stoppedBeforeStart();
  }
  let samples: TrainingSamples;
  try {
    // older runs' config.json has no sample settings
    samples = new TrainingSamples(model, data.tokenizer, config.samplePrompts ?? [], config.sampleMaxTokens ?? 64);
  } catch (err) {
    model.dispose();
    throw err;
  }
  if (!resume) {
    try {
      fs.mkdirSync(runDir, { recursive: true });
      claimRunFolder();
      // again, now that the folder is this process's: another `train --out` of the same folder may have got there
      // while this one read its data and model
      assertNoRunIn(runDir);
      writeJsonAtomic(path.join(runDir, 'config.json'), config);
    } catch (err) {
      model.dispose();
      throw err;
    }
  }
  const log = new EventLog(runDir);
  if (options.onEvent) log.onEvent(options.onEvent);
  const digest = configDigest(config);
  const examplesDigest = dataDigest(data.train, data.eval);
  const started = Date.now();
  let step = 0;
  let lastCheckpointDir: string | null = null;
  try {
    for (const w of [...placement.warnings, ...data.warnings]) log.emit({ kind: 'warning', message: w });
    try {
      saveTokenCache(runDir, data);
    } catch (err) {
      log.emit({ kind: 'warning', message: `could not keep the tokenized data in ${path.join(runDir, TOKEN_CACHE_DIR)} (${err instanceof Error ? err.message : String(err)}); a resume will tokenize the data again` });
    }
    let elapsedBefore = 0;
    let lastLoss: number | null = null;
    let batchLayout: BatchLayout = 'epochs';
    // fp16 compute scales the loss (dynamic loss scaling); fp32 and bf16 need none
    let scaler = placement.device.kind === 'cuda' && placement.device.computeDtype === 'fp16' ? new LossScaler() : null;
    const checkpoint = resume ? latestCheckpoint(runDir) : null;
    if (resume && !checkpoint) {
      // Killed before its first checkpoint: start over from step 0 in the same folder.
      log.emit({ kind: 'warning', message: 'no complete checkpoint yet; starting the run from the beginning' });
    }
    if (checkpoint) {
      const state: TrainerState = readTrainerState(checkpoint.dir);
      if (state.configDigest !== digest)
        throw new TrainingError(`${path.join(runDir, 'config.json')} changed since checkpoint step ${state.step} was written; resume needs the run's original settings`);
      // Changed data is allowed (a fix to a few rows is worth going on with) but said: the steps ahead draw other
      // examples than the ones the run's order was made for
      if (state.dataDigest !== undefined && state.dataDigest !== examplesDigest)
        log.emit({ kind: 'warning', message: `the training data is not what it was at checkpoint step ${state.step} (${config.data}${config.evalData ? ` or ${config.evalData}` : ''} changed, or the model's tokenizer or chat template did); the run goes on with the data as it is now` });
      model.loadAdapter(path.join(checkpoint.dir, 'adapter'));
      model.loadOptimizerState(path.join(checkpoint.dir, 'optimizer.safetensors'));
      // The final adapter a stop wrote is this checkpoint's (a stop saves both at its last step); from here on the
      // checkpoints are newer, and a kill must not leave it standing as the run's adapter.
      removeFolderAtomic(path.join(runDir, 'adapter'));
      step = state.step;
      if (scaler && state.lossScaler) scaler = new LossScaler(DEFAULT_LOSS_SCALER, state.lossScaler);
      elapsedBefore = state.elapsedSeconds;
      lastLoss = state.lastLoss;
      lastCheckpointDir = checkpoint.dir;
      batchLayout = state.batchLayout ?? 'continuous';
    } else {
      model.createLora({ rank: config.rank, alpha: config.alpha, dropout: config.dropout, useRslora: config.useRslora, targets: config.targets, seed: config.seed });
    }
    pruneCheckpoints(runDir, config.keepCheckpoints);

    const batches = new BatchSchedule(data.train, config.batchSize, (epoch) => epochOrder(data.train.length, config.seed, epoch), config.gradAccum, batchLayout);
    const totalSteps = config.maxSteps ?? batches.totalSteps(config.epochs);
    const schedule: Schedule = { kind: config.schedule, lr: config.lr, warmupSteps: config.warmupSteps, totalSteps };
    log.emit({
      kind: 'run-started',
      protocol: 1,
      runDir: path.resolve(runDir),
      config: config as unknown as Record<string, unknown>,
      dataset: data.stats,
      trainableParameters: model.loraInfo()?.parameters ?? 0,
      // with the block inputs the plan moves to host memory gone from the activations
      memoryEstimate: {
        categories: { ...estimate.categories, activations: estimate.categories.activations - offloadedBytes },
        peakTotal: estimate.peakTotal - offloadedBytes,
      },
      totalSteps,
      // a resume with no checkpoint yet starts over: from step 0, so that readers drop the steps logged before
      resumedFrom: checkpoint ? checkpoint.step : resume ? 0 : null,
      device: runDevice(placement, plan),
    });
    const warmup = warmupWarning(schedule);
    if (warmup !== null) log.emit({ kind: 'warning', message: warmup });
    // Every move of the paged optimizer and of offloaded block inputs, as it happened (none without a budget).
    const emitPageMoves = () => {
      for (const m of model.takePageMoves()) log.emit({ kind: 'page', dir: m.dir, tensor: m.tensor, bytes: m.bytes, ms: m.ms });
    };
    const gpu = placement.device.gpu
      ? new GpuMonitor(placement.device.gpu.index, options.gpuSource ?? (() => gpuTelemetry(options.placement?.cudaLibraryDir)))
      : null;
    const sampleGpu = () => {
      const e = gpu?.poll(Date.now());
      if (e) log.emit(e);
    };
    sampleGpu();

    const state = (): TrainerState => ({
      step,
      epoch: batches.epochsAfter(step),
      microBatchesDone: batches.microBatchesAfter(step),
      batchLayout,
      lastLoss: lastLoss ?? NaN,
      seed: config.seed,
      elapsedSeconds: elapsedBefore + (Date.now() - started) / 1000,
      configDigest: digest,
      dataDigest: examplesDigest,
      ...(placement.device.kind === 'cuda' ? { computeDtype: placement.device.computeDtype } : {}),
      ...(scaler ? { lossScaler: scaler.snapshot() } : {}),
    });
    const saveCheckpoint = () => {
      lastCheckpointDir = writeCheckpoint(runDir, model, state(), config.model);
      pruneCheckpoints(runDir, config.keepCheckpoints);
      log.emit({ kind: 'checkpoint', step, path: lastCheckpointDir });
    };
    const runSamples = async () => {
      if (samples.count === 0) return;
      const r = await samples.answer(step);
      for (const e of r.events) log.emit(e);
    };
    const runEval = async () => {
      if (data.eval.length > 0) {
        const r = await evaluate(model, data.eval, config.batchSize, data.padId, control);
        if (r === null) return; // stopped: no eval event, no samples; the run saves and ends
        const finite = Number.isFinite(r.loss);
        log.emit({ kind: 'eval', step, evalLoss: finite ? r.loss : null, evalTokens: r.tokens });
        if (!finite) {
          const why = r.tokens === 0
            ? ': the eval examples have no labelled tokens'
            : scaler
              ? ': in fp16 compute an activation passed fp16\'s range (65504); --dtype f32, or bf16 on an Ampere or newer GPU, avoids it'
              : '';
          log.emit({ kind: 'warning', message: `the eval loss at step ${step} is ${r.loss}${why}` });
        }
      }
      if (control.stopRequested) return; // heard during the eval's last micro-batches: the stop saves at once
      await runSamples();
      emitPageMoves();
      heartbeat();
    };
    const emitMemory = () => {
      const m = model.memory();
      log.emit({
        kind: 'memory', step, current: m.current, peak: m.peak, totalCurrent: m.totalCurrent, totalPeak: m.totalPeak,
        highWater: m.highWater, highWaterTotal: m.highWaterTotal, device: gpu?.device() ?? null,
      });
      model.beginMemoryInterval();
    };

    // the answers before any training (the adapter's B is zero: the base model), to compare the later ones with
    if (step === 0) await runSamples();

    const firstStep = step;
    let tokensSinceStart = 0;
    const loopStart = Date.now();
    control.training = true;
    while (step < totalSteps) {
      if (control.stopRequested) break;
      const micro = batches.microBatchesOf(step).map((g) => makeMicroBatch(batches.examplesOf(g), data.padId));
      // The loss of a step is the mean over all labelled tokens of all its micro-batches (not a mean of means).
      const labelled = micro.reduce((n, mb) => n + mb.labelled, 0);
      model.zeroGrad();
      let lossSum = 0;
      micro.forEach((mb, i) => {
        const r = model.run(
          { ids: mb.ids, labels: mb.labels, batch: mb.batch, seq: mb.seq },
          { computeGrads: true, training: true, gradientCheckpointing: config.gradientCheckpointing, offloadBlockInputs: plan?.offloadBlockInputs ?? 0, gradNormalizer: Math.max(1, labelled), seed: config.seed, step: step + 1, microBatch: i, lossScale: scaler?.scale ?? 1 },
        );
        lossSum += r.lossSum;
      });
      const loss = labelled > 0 ? lossSum / labelled : NaN;
      if (!Number.isFinite(loss)) {
        // resuming repeats the same steps (a changed config is refused), so the way on is a new run that trains gentler
        const why = labelled === 0
          ? ' (no labelled tokens in the batch)'
          : scaler
            ? ': in fp16 compute an activation passed fp16\'s range (65504); resume with --dtype f32, or bf16 on an Ampere or newer GPU'
            : `; resuming repeats the same steps, so the way on is a new run (with a lower --lr than ${config.lr} if the loss was rising before)`;
        throw new TrainingError(`the loss became ${loss} at step ${step + 1}${why}`);
      }
      const lr = learningRate(schedule, step + 1);
      let report;
      try {
        report = model.optimizerStep({
          lr, beta1: config.beta1, beta2: config.beta2, eps: config.eps, weightDecay: config.weightDecay, maxGradNorm: config.maxGradNorm,
          lossScale: scaler?.scale ?? 1, skipNonFinite: scaler?.canBackOff ?? false,
        });
      } catch (err) {
        if (err instanceof EngineError && /not finite/.test(err.message)) throw new TrainingError(`training diverged at step ${step + 1}: ${err.message}`);
        throw err;
      }
      // A skipped update still counts as a step (its data is consumed and the learning-rate schedule moves on, as a
      // plain GradScaler loop does); the message has no step number, so that the Problems list shows each once.
      if (scaler) {
        if (report.skipped) {
          const was = scaler.scale;
          scaler.update(true);
          log.emit({ kind: 'warning', message: `the fp16 gradients overflowed at loss scale ${was}: that step's update was skipped and the scale lowered to ${scaler.scale}` });
        } else {
          scaler.update(false);
        }
      }
      emitPageMoves();
      sampleGpu();
      heartbeat();
      step += 1;
      lastLoss = loss;
      tokensSinceStart += micro.reduce((n, mb) => n + mb.tokens, 0);
      const now = Date.now();
      const secondsThisRun = (now - loopStart) / 1000;
      const stepsThisRun = step - firstStep;
      log.emit({
        kind: 'step',
        step,
        totalSteps,
        epoch: batches.epochsAfter(step),
        loss,
        lr,
        gradNorm: report.skipped ? null : report.gradNorm,
        tokensPerSecond: tokensSinceStart / Math.max(1e-9, secondsThisRun),
        elapsedSeconds: elapsedBefore + (now - started) / 1000,
        etaSeconds: stepsThisRun > 0 ? (secondsThisRun / stepsThisRun) * (totalSteps - step) : null,
      });
      if (step === firstStep + 1 || step % 10 === 0) emitMemory();
      if (config.evalEvery > 0 && step % config.evalEvery === 0 && step < totalSteps) await runEval();
      if ((config.checkpointEvery > 0 && step % config.checkpointEvery === 0 && step < totalSteps) || control.saveRequested) {
        control.saveRequested = false;
        saveCheckpoint();
      }
      await yieldToEventLoop();
    }

    const stopped = step < totalSteps;
    // A stop (the user's, or the window's closing) saves at once: the final eval and samples, which can take longer
    // than a closing window waits, are for a run that completed.
    if (!stopped) await runEval();
    if (step > firstStep || !lastCheckpointDir) saveCheckpoint();
    const adapterPath = saveFinalAdapter(runDir, model, config.model);
    const elapsed = elapsedBefore + (Date.now() - started) / 1000;
    log.emit({ kind: 'finished', status: stopped ? 'stopped' : 'completed', step, adapterPath, finalLoss: lastLoss, elapsedSeconds: elapsed });
    return { status: stopped ? 'stopped' : 'completed', step, totalSteps, adapterPath, finalLoss: lastLoss, runDir };
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    log.emit({ kind: 'error', message, step: step > 0 ? step : null, lastCheckpoint: lastCheckpointDir });
    log.emit({ kind: 'finished', status: 'failed', step, adapterPath: null, finalLoss: null, elapsedSeconds: (Date.now() - started) / 1000 });
    throw err;
  } finally {
    model.dispose();
    log.close();
  }
}
