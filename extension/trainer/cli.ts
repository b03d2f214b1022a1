// The qlora-studio command line: every engine capability is scriptable and testable through it, and the trainer
// process of the extension runs the same code. Errors go to stderr as one sentence (the stack only with --debug)
// and exit with status 1.
import { isMainThread } from 'node:worker_threads';
import { engineInfo, engineVersion, EngineError } from '../engine';
import { helpText, integerOption, parseIdList, parseOptions, requiredString, stringOption, UsageError, type OptionSpec } from './cliArgs';
import { print, printWarnings } from './cliOutput';
import { makeTinyModel } from './tinyModel/makeTinyModel';
import { quantize } from './verbs/quantize';
import { benchOptions, benchVerb } from './verbs/bench';
import { estimateVerb } from './verbs/estimate';
import { adapterFlag, exportAdapter } from './verbs/export';
import { exportGgufOptions, exportGgufVerb, verifyGgufOptions, verifyGgufVerb } from './verbs/exportGguf';
import { exportOllamaOptions, exportOllamaVerb } from './verbs/exportOllama';
import { inspectDataOptions, inspectDataVerb } from './verbs/inspectData';
import { chatServerOptions, chatServerVerb } from './verbs/chatServer';
import { doctorOptions, doctorVerb } from './verbs/doctor';
import { generateOptions, generateVerb } from './verbs/generate';
import { mergeVerb, parseMergeDtype } from './verbs/merge';
import { score } from './verbs/score';
import { engineOptions, placementFromFlags, placementOptions, placeRun, refuseHalfDtypeFallback } from './placement';
import { resumeVerb, trainOptions, trainVerb } from './verbs/train';

interface Verb {
  summary: string;
  options: Record<string, OptionSpec>;
  run(options: ReturnType<typeof parseOptions>): void | Promise<void>;
}

const verbs: Record<string, Verb> = {
  train: {
    summary: 'finetune a model with QLoRA on a dataset into a run folder (checkpoints, events, adapter)',
    options: trainOptions,
    run: trainVerb,
  },
  generate: {
    summary: "answer a prompt with a model, a model + adapter or a run's adapter (streamed); --compare shows base and finetuned",
    options: generateOptions,
    run: generateVerb,
  },
  doctor: {
    summary: 'what this machine offers the GPU engine (driver, GPUs, cuBLASLt, NVML) and what to do about each problem',
    options: doctorOptions,
    run: doctorVerb,
  },
  'chat-server': {
    summary: 'the process behind the chat panel: holds a model and answers over the IPC channel of the extension that forked it',
    options: chatServerOptions,
    run: chatServerVerb,
  },
  resume: {
    summary: "continue a run from its newest complete checkpoint",
    options: {
      run: { type: 'string', required: true, description: 'the run folder' },
      ...placementOptions,
      json: { type: 'boolean', description: 'print the outcome as JSON (no progress output)' },
    },
    run: resumeVerb,
  },
  export: {
    summary: "copy a run's adapter (final, or of a checkpoint) to a folder, in PEFT's layout",
    options: {
      run: { type: 'string', required: true, description: 'the run folder' },
      out: { type: 'string', required: true, description: 'folder to write the adapter into' },
      checkpoint: { type: 'string', description: 'checkpoint step to export (default: the final adapter)' },
      json: { type: 'boolean', description: 'print JSON' },
    },
    run(o) {
      const step = stringOption(o, 'checkpoint') === undefined ? undefined : integerOption(o, 'checkpoint', 0);
      const r = exportAdapter({ run: requiredString(o, 'run'), out: requiredString(o, 'out'), checkpoint: step });
      printWarnings(r.notCopied);
      print(o.json ? JSON.stringify(r) : `exported ${r.from} to ${r.out}`);
    },
  },
  'make-tiny-model': {
    summary: 'write a tiny random model in Hugging Face layout, with a real tokenizer (byte-level BPE; SentencePiece-style for --arch mistral)',
    options: {
      out: { type: 'string', required: true, description: 'folder to write the model into' },
      arch: { type: 'string', description: 'llama (default, Llama 3 style), mistral (Llama 2 / Mistral style SentencePiece vocabulary) or qwen2' },
      seed: { type: 'string', description: 'random seed (integer, default 0)' },
      size: { type: 'string', description: 'tiny (default, for tests), kquant (GGUF k-quant tests) or small (benchmarks)' },
      json: { type: 'boolean', description: 'print a JSON summary' },
    },
    run(o) {
      const arch = stringOption(o, 'arch') ?? 'llama';
      if (arch !== 'llama' && arch !== 'qwen2' && arch !== 'mistral') throw new UsageError(`--arch must be llama, mistral or qwen2, got '${arch}'`);
      const size = stringOption(o, 'size') ?? 'tiny';
      if (size !== 'tiny' && size !== 'kquant' && size !== 'small') throw new UsageError(`--size must be tiny, kquant or small, got '${size}'`);
      const summary = makeTinyModel({ out: requiredString(o, 'out'), arch, seed: integerOption(o, 'seed', 0), size });
      print(o.json ? JSON.stringify(summary) : `wrote a tiny ${arch} model (${summary.parameters} parameters, vocabulary ${summary.vocabSize}) to ${summary.dir}`);
    },
  },
  score: {
    summary: 'loss and next-token log-probs of a token sequence, as transformers computes them (fp32)',
    options: {
      model: { type: 'string', required: true, description: 'Hugging Face model folder (plain or bnb-4bit)' },
      adapter: { type: 'string', description: 'PEFT LoRA adapter folder' },
      ids: { type: 'string', required: true, description: 'comma-separated token ids, e.g. 1,5,200' },
      grads: { type: 'string', description: 'write d loss / d LoRA parameters to this safetensors file' },
      device: placementOptions.device,
      dtype: { ...placementOptions.dtype, description: 'compute dtype on the GPU: f32 (default here, as transformers in fp32), bf16 or fp16 (as torch.autocast)' },
      'cuda-lib-dir': placementOptions['cuda-lib-dir'],
      json: { type: 'boolean', description: 'print {"loss", "next_token_logprobs"} as JSON' },
    },
    run(o) {
      // --device cuda that cannot be had is an error; auto's CPU fallback is not worth a warning for one sequence
      const flags = placementFromFlags(o);
      const placement = placeRun({ ...flags, computeDtype: flags.computeDtype ?? 'f32' });
      refuseHalfDtypeFallback(flags.computeDtype, placement);
      const result = score({
        engine: { ...engineOptions(placement), memoryBudget: 0 },
        model: requiredString(o, 'model'),
        adapter: adapterFlag(o),
        ids: parseIdList(requiredString(o, 'ids'), 'ids'),
        gradsFile: stringOption(o, 'grads'),
      });
      if (o.json) return print(JSON.stringify(result));
      print(`loss ${result.loss.toFixed(6)} over ${result.next_token_logprobs.length} predictions`);
      result.next_token_logprobs.forEach((lp, i) => print(`  position ${i + 1}: log p = ${lp.toFixed(6)}`));
    },
  },
  quantize: {
    summary: 'write a model as a bnb-4bit checkpoint (NF4, blocks of 64, double quantization by default)',
    options: {
      model: { type: 'string', required: true, description: 'Hugging Face model folder (f32/bf16/f16 safetensors)' },
      out: { type: 'string', required: true, description: 'folder for the quantized model' },
      'no-double-quant': { type: 'boolean', description: 'keep the block constants in fp32 instead of 8 bits' },
      dtype: { type: 'string', description: 'cast the model first: bf16, f16 or f32 (or bfloat16, float16, float32; default: as stored)' },
      json: { type: 'boolean', description: 'print a JSON report' },
    },
    run(o) {
      const dtypeText = stringOption(o, 'dtype');
      const dtype = dtypeText === undefined ? undefined : parseMergeDtype(dtypeText); // the same names as merge's
      const report = quantize({ model: requiredString(o, 'model'), out: requiredString(o, 'out'), doubleQuant: !o['no-double-quant'], dtype });
      printWarnings(report.notCopied);
      if (o.json) return print(JSON.stringify(report));
      const mb = (b: number) => (b / 1048576).toFixed(2);
      print(`quantized ${report.quantizedTensors} linear weights to NF4 and copied ${report.copiedTensors} tensors: ${mb(report.bytesIn)} MB -> ${mb(report.bytesOut)} MB in ${report.out}`);
    },
  },
  'inspect-data': {
    summary: 'check a dataset: format, shape, invalid rows, token lengths, examples with the trained part marked (exit status 2: invalid rows)',
    options: inspectDataOptions,
    run: inspectDataVerb,
  },
  merge: mergeVerb,
  'export-gguf': {
    summary: 'write a run\'s merged model (or a base model) as a GGUF file for llama.cpp, Ollama and LM Studio',
    options: exportGgufOptions,
    run: exportGgufVerb,
  },
  'export-ollama': {
    summary: "write a run's merged model as a folder for Ollama: model.gguf and a Modelfile with its chat template and stops",
    options: exportOllamaOptions,
    run: exportOllamaVerb,
  },
  'verify-gguf': {
    summary: 'check a GGUF file in llama.cpp against the engine: next-token log-probs and chat prompt tokens',
    options: verifyGgufOptions,
    run: verifyGgufVerb,
  },
  estimate: estimateVerb,
  bench: {
    summary: 'QLoRA training speed and memory on a synthetic Llama-3 1B, 8B or 70B (random NF4 weights, no files): tokens/s, step time, peak memory by category, paging, MFU',
    options: benchOptions,
    run: benchVerb,
  },
  'engine-info': {
    summary: 'the engine version and the compute backends it can use',
    options: { json: { type: 'boolean', description: 'print JSON' } },
    run(o) {
      const info = { version: engineVersion(), ...engineInfo() };
      print(o.json ? JSON.stringify(info) : `QLoRA engine ${info.version}: backends ${info.backends.join(', ')}; ${info.threads} CPU threads`);
    },
  },
};

function usage(): string {
  const lines = ['usage: qlora-studio <verb> [options]   (qlora-studio <verb> --help for its options)', '', 'verbs:'];
  for (const [name, verb] of Object.entries(verbs)) lines.push(`  ${name.padEnd(16)} ${verb.summary}`);
  return lines.join('\n');
}

/** Runs the CLI; resolves to the exit status. */
export async function main(argv: string[]): Promise<number> {
  const debug = argv.includes('--debug');
  const args = argv.filter((a) => a !== '--debug');
  const [verbName, ...rest] = args;
  if (!verbName || verbName === '--help' || verbName === 'help') {
    print(usage());
    return verbName ? 0 : 1;
  }
  const verb = verbs[verbName];
  try {
    if (!verb) throw new UsageError(`unknown verb '${verbName}' (known: ${Object.keys(verbs).join(', ')})`);
    if (rest.includes('--help')) {
      print(helpText(verbName, verb.summary, verb.options));
      return 0;
    }
    await verb.run(parseOptions(verbName, rest, verb.options));
    // a verb may end with a failure it has already reported (export-gguf: the file is written, the check failed)
    return Number(process.exitCode ?? 0);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`qlora-studio: ${message}\n`);
    if (debug && err instanceof Error && err.stack) process.stderr.write(err.stack + '\n');
    if (err instanceof UsageError) process.stderr.write(`run "qlora-studio ${verb ? verbName + ' ' : ''}--help" for usage\n`);
    return 1;
  }
}

/**
 * Output read by a pipe that closed early (`qlora-studio score ... | head -1`): the rest of the output has nowhere
 * to go and is dropped, and the command goes on to its end, so that a run whose progress went to such a pipe is not
 * killed before its checkpoint. Any other stream error is still an error.
 */
function dropOutputToClosedPipes(stream: NodeJS.WriteStream): void {
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE' && err.code !== 'ERR_STREAM_DESTROYED') throw err;
  });
}

// A worker thread runs this bundle too (extension/data/tokenizeWorkers.ts): the command line is the main thread's.
if (require.main === module && isMainThread) {
  dropOutputToClosedPipes(process.stdout);
  dropOutputToClosedPipes(process.stderr);
  void main(process.argv.slice(2)).then((status) => {
    process.exitCode = status;
  });
}

export { EngineError };
