// Runs a GGUF file in real llama.cpp, through node-llama-cpp's prebuilt CPU binary, to read back what llama.cpp
// computes from our exports: the next-token log-probabilities at every position of a token sequence, and its tokenizer.
// Nothing is built or downloaded here: node-llama-cpp is told never to build and never to fetch, so this works offline
// and fails with a message naming the package to install when the binary is not there. llama.cpp runs in this process
// and aborts it on some malformed files (a GGML_ASSERT, e.g. a missing feed_forward_length), so check a fresh export
// from a child process when a crash must not take the caller down.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import type * as NodeLlamaCpp from 'node-llama-cpp';
import { packageRoot } from '../engine/addon';

type Module = typeof NodeLlamaCpp;

export interface OpenGgufOptions {
  /** CPU threads for evaluation; default: the cores node-llama-cpp counts as useful for math. */
  threads?: number;
  /**
   * Keep the K/V cache in f32 and flash attention off, so attention runs in f32 like our engine and an f32 GGUF
   * reproduces an fp64 forward pass to ~1e-5. Default: llama.cpp's own defaults (f16 K/V cache, flash attention when
   * supported), which is how llama.cpp, Ollama and LM Studio run the file, at ~1e-2 in log-prob from fp64.
   */
  f32Attention?: boolean;
  /** A GGUF LoRA (general.type "adapter") to apply to the model in every context, as llama.cpp's --lora does. */
  lora?: { file: string; scale?: number };
}

export interface GgufModel {
  readonly file: string;
  readonly architecture: string;
  /** Tokens in tokenizer.ggml.tokens: the length of every row scoreTokens returns (checked against llama.cpp's). */
  readonly vocabSize: number;
  readonly trainContextSize: number;
  readonly bos: number | null;
  readonly eos: number | null;
  /** tokenizer.chat_template as llama.cpp reads it, when the file has one. */
  readonly chatTemplate: string | undefined;
  /** Token ids of text, without a BOS; `special` parses control-token text such as `<s>` into those tokens. */
  tokenize(text: string, options?: { special?: boolean }): number[];
  detokenize(ids: readonly number[], options?: { special?: boolean }): string;
  /**
   * Teacher-forced log-softmax of the raw logits after every position: row t is log p(· | ids[0..t]), a vocabSize-long
   * row, so row t at ids[t + 1] is that token's log-probability. Each call starts from an empty context. llama.cpp's
   * binding computes the softmax in fp32, so entries under about -87 lose precision and those under -103 are -Infinity.
   */
  scoreTokens(ids: readonly number[]): Promise<Float32Array[]>;
  close(): Promise<void>;
}

/** log p(ids[t + 1] | ids[0..t]) for t = 0..n-2 from scoreTokens' rows: what `score` calls next_token_logprobs. */
export function nextTokenLogprobs(rows: readonly Float32Array[], ids: readonly number[]): number[] {
  if (rows.length !== ids.length) throw new Error(`${rows.length} rows for ${ids.length} tokens`);
  return ids.slice(1).map((id, t) => rows[t][id]);
}

/** node-llama-cpp as our package.json pins it, for the install hint ("node-llama-cpp" alone when unreadable). */
function pinnedSpec(): string {
  try {
    const manifest = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { dependencies?: Record<string, string> };
    const version = manifest.dependencies?.['node-llama-cpp'];
    return version === undefined ? 'node-llama-cpp' : `node-llama-cpp@${version}`;
  } catch {
    return 'node-llama-cpp';
  }
}

// node-llama-cpp's prebuilt binary package for this machine (its optional dependencies). On Apple silicon only the
// Metal build is published; it evaluates on the CPU here since no layers are offloaded.
function binaryPackage(): { name: string; gpu: false | 'metal' } | undefined {
  const key = `${process.platform}-${process.arch}`;
  const names: Record<string, string> = {
    'linux-x64': 'linux-x64',
    'linux-arm64': 'linux-arm64',
    'linux-arm': 'linux-armv7l',
    'darwin-x64': 'mac-x64',
    'darwin-arm64': 'mac-arm64-metal',
    'win32-x64': 'win-x64',
    'win32-arm64': 'win-arm64',
  };
  const name = names[key];
  if (name === undefined) return undefined;
  return { name: `@node-llama-cpp/${name}`, gpu: key === 'darwin-arm64' ? 'metal' : false };
}

// tsc (module: commonjs) and esbuild (format: cjs) both turn a literal import() into require(), and node-llama-cpp is
// an ES module with top-level await, which require() cannot load. A Function body is left alone by both.
const importEsm = new Function('url', 'return import(url)') as (url: string) => Promise<unknown>;

let loaded: Promise<{ lib: Module; llama: NodeLlamaCpp.Llama }> | undefined;

async function loadLlama(): Promise<{ lib: Module; llama: NodeLlamaCpp.Llama }> {
  let entry: string;
  try {
    entry = require.resolve('node-llama-cpp');
  } catch {
    throw new Error(`node-llama-cpp is not installed; it is a dependency of qlora-studio: run "npm ci" (or "npm install ${pinnedSpec()}")`);
  }
  const lib = (await importEsm(pathToFileURL(entry).href)) as Module;
  const pkg = binaryPackage();
  if (pkg === undefined) throw new Error(`node-llama-cpp publishes no prebuilt llama.cpp binary for ${process.platform}-${process.arch}`);
  const version = (JSON.parse(fs.readFileSync(path.join(path.dirname(entry), '..', 'package.json'), 'utf8')) as { version: string }).version;
  try {
    const llama = await lib.getLlama({
      gpu: pkg.gpu,
      build: 'never', // never compile llama.cpp from source
      skipDownload: true, // never fetch llama.cpp's sources
      usePrebuiltBinaries: true,
      progressLogs: false,
      maxThreads: 0, // no cap: each context's `threads` is what it runs with
      logLevel: lib.LlamaLogLevel.warn,
      // llama.cpp's warnings go to stderr, keeping stdout for the CLI's output
      logger: (level, message) => process.stderr.write(`llama.cpp ${level}: ${message.trimEnd()}\n`),
    });
    return { lib, llama };
  } catch (e) {
    if (e instanceof lib.NoBinaryFoundError) {
      throw new Error(
        `llama.cpp's prebuilt binary for ${process.platform}-${process.arch} is missing or does not load: install ${pkg.name}@${version} ` +
          `(npm ci installs it with node-llama-cpp unless optional dependencies are omitted)`,
      );
    }
    throw e;
  }
}

export async function openGguf(file: string, options: OpenGgufOptions = {}): Promise<GgufModel> {
  if (!fs.existsSync(file)) throw new Error(`GGUF file not found: ${file}`);
  if (options.lora !== undefined && !fs.existsSync(options.lora.file)) throw new Error(`GGUF LoRA file not found: ${options.lora.file}`);
  if (options.threads !== undefined && !(Number.isInteger(options.threads) && options.threads >= 1)) {
    throw new Error(`threads must be a positive integer, got ${options.threads}`);
  }
  loaded ??= loadLlama().catch((e: unknown) => {
    loaded = undefined; // a later call (after installing what was missing) tries again
    throw e;
  });
  const { llama } = await loaded;
  const threads = options.threads ?? llama.cpuMathCores;
  const model = await llama.loadModel({ modelPath: path.resolve(file), gpuLayers: 0 });
  const tokenCount = model.fileInfo.metadata.tokenizer?.ggml?.tokens?.length;
  if (typeof tokenCount !== 'number') {
    await model.dispose();
    throw new Error(`${file} has no tokenizer.ggml.tokens`);
  }
  const vocabSize = tokenCount;
  const asTokens = (ids: readonly number[]) => ids as unknown as NodeLlamaCpp.Token[];

  async function scoreTokens(ids: readonly number[]): Promise<Float32Array[]> {
    ids.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= vocabSize) throw new Error(`token ${i} is ${id}, outside the vocabulary [0, ${vocabSize})`);
    });
    if (ids.length === 0) return [];
    // One sequence sized to the input, evaluated as a single batch (n_ubatch = batchSize), from an empty cache.
    const context = await model.createContext({
      contextSize: ids.length,
      batchSize: ids.length,
      sequences: 1,
      threads,
      // node-llama-cpp loads the adapter once per model (llama_adapter_lora_init) and attaches it to each context
      ...(options.lora !== undefined ? { lora: { adapters: [{ filePath: path.resolve(options.lora.file), scale: options.lora.scale ?? 1 }] } } : {}),
      ...(options.f32Attention === true
        ? { experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32', flashAttention: false }
        : {}),
    });
    try {
      const sequence = context.getSequence();
      // generateNext.probabilities is the softmax, over the whole vocabulary, of llama_get_logits_ith at that position
      // after node-llama-cpp's sampler chain. At its default temperature 0 that chain holds only the greedy sampler (no
      // top-k/top-p/min-p; no penalties, bias or grammar are given here), which picks a token and changes no logit.
      const results = await sequence.controlledEvaluate(asTokens(ids).map((id) => [id, { generateNext: { probabilities: true } }]));
      return ids.map((_, t) => {
        const probabilities = results[t]?.next.probabilities;
        if (probabilities === undefined || probabilities.size !== vocabSize) {
          throw new Error(`llama.cpp returned ${probabilities?.size ?? 0} probabilities at position ${t}, expected ${vocabSize}`);
        }
        const row = new Float32Array(vocabSize);
        for (const [token, p] of probabilities) row[token] = Math.log(p);
        return row;
      });
    } finally {
      await context.dispose();
    }
  }

  return {
    file,
    architecture: model.fileInfo.metadata.general.architecture,
    vocabSize,
    trainContextSize: model.trainContextSize,
    bos: model.tokens.bos,
    eos: model.tokens.eos,
    chatTemplate: model.fileInfo.metadata.tokenizer?.chat_template,
    tokenize: (text, o = {}) => model.tokenize(text, o.special ?? false),
    detokenize: (ids, o = {}) => model.detokenize(asTokens(ids), o.special ?? false),
    scoreTokens,
    close: () => model.dispose(),
  };
}
