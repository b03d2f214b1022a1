// The check after every GGUF export: llama.cpp (node-llama-cpp's prebuilt binary) loads the written file, scores
// a few held-out sequences, and its next-token log-probabilities are compared with our engine's on the same
// tokens (base + adapter, as trained). Also: llama.cpp's tokenizer must turn a chat-template-rendered prompt into
// the same ids as ours. An export is "verified" only within the tolerance of its type.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exportedChatTemplate, loadModelTokenizer, renderExample, type ModelTokenizer } from '../data';
import { EngineModel } from '../engine';
import { prepareData } from '../trainer/data';
import type { TrainConfig } from '../trainer/config';
import type { GgufFileType } from './gguf/types';
import { openGguf } from './llamaCpp';
import { readJsonFile } from '../util/jsonFile';

/** How close llama.cpp must come to our engine for an export to count as verified, by its type. */
interface Criterion {
  text: string;
  /** What fails the check, or null. */
  /** confidentTop1 is null when too few positions are confident to judge (a flat model): the KL decides alone. */
  failure(r: { maxAbs: number; top1: number; confidentTop1: number | null; meanKl: number }): string | null;
}

const maxLogprobDiff = (type: GgufFileType, bound: number): Criterion => ({
  text: `max |Δ log-prob| <= ${bound}`,
  failure: (r) => (r.maxAbs <= bound ? null : `llama.cpp's next-token log-probabilities differ from the engine's by up to ${r.maxAbs.toFixed(4)} (tolerance ${bound} for ${type})`),
});

/**
 * Q4_K_M moves the weights by ~7% RMS, so single log-probs move by tenths of a nat and, where the engine itself
 * hesitates between tokens, the top token can flip. What must hold: where the engine makes a clear choice (its top
 * token has p >= 0.5) llama.cpp makes the same one at >= 90% of positions, and the mean KL over all positions stays
 * small. Measured on the project's models with correct exports: mean KL 0.022 to 0.052 and 100% agreement at the
 * confident positions; an export with a wrong tensor layout gives KL > 1. The bound is 0.1 nats.
 */
export const Q4_K_M_MEAN_KL_BOUND = 0.1;
const MIN_CONFIDENT_POSITIONS = 10;

export const CRITERIA: Record<GgufFileType, Criterion> = {
  f32: maxLogprobDiff('f32', 0.05),
  f16: maxLogprobDiff('f16', 0.05),
  bf16: maxLogprobDiff('bf16', 0.05),
  q8_0: maxLogprobDiff('q8_0', 0.2),
  q4_k_m: {
    text: `top-1 agreement >= 90% where the engine's top token has p >= 0.5, and mean KL <= ${Q4_K_M_MEAN_KL_BOUND}`,
    failure: (r) =>
      (r.confidentTop1 !== null && r.confidentTop1 < 0.9) || !(r.meanKl <= Q4_K_M_MEAN_KL_BOUND)
        ? `llama.cpp picks the engine's clear top token at ${r.confidentTop1 === null ? 'too few positions to judge' : `${(100 * r.confidentTop1).toFixed(1)}% of those positions`} with mean KL ${r.meanKl.toFixed(4)} (q4_k_m needs >= 90% and <= ${Q4_K_M_MEAN_KL_BOUND})`
        : null,
  },
};

export interface VerifyReport {
  verified: boolean;
  type: GgufFileType;
  sequences: number;
  /** Next-token predictions compared. */
  tokens: number;
  maxAbsLogprobDiff: number;
  meanAbsLogprobDiff: number;
  /** Share of positions where both pick the same most likely next token. */
  top1Agreement: number;
  /** The same over the positions where the engine gives its top token p >= 0.5 (a clear choice), and their count. */
  confidentTop1Agreement: number;
  confidentPositions: number;
  /** Mean KL(ours ‖ llama.cpp) over positions, in nats. */
  meanKl: number;
  promptTokensMatch: boolean;
  tolerance: string;
  /** Plain sentences on what differs; empty when verified. */
  problems: string[];
}

const MAX_SEQUENCES = 4;
const MAX_TOKENS = 64;

/** A few held-out sequences: the run's eval split (else its first training examples), or sample text. */
async function sequencesToScore(tok: ModelTokenizer, run: string | null): Promise<number[][]> {
  if (run !== null) {
    const config = readJsonFile(path.join(run, 'config.json')) as TrainConfig;
    if (fs.existsSync(config.data)) {
      const data = await prepareData(config, { runDir: run });
      const pool = data.eval.length > 0 ? data.eval : data.train;
      return pool.slice(0, MAX_SEQUENCES).map((e) => Array.from(e.ids.slice(0, MAX_TOKENS)));
    }
  }
  const texts = [
    'The capital of France is Paris. It is known for the Eiffel Tower and its museums.',
    'A language model predicts the next token from the tokens before it.',
    'def add(a, b):\n    return a + b\n',
  ];
  return texts.map((t) => [...(tok.addsBos && tok.bosId !== null ? [tok.bosId] : []), ...tok.encode(t)].slice(0, MAX_TOKENS));
}

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/**
 * Below this, llama.cpp's fp32 softmax has no precise log-probability to compare (subnormal probabilities lose
 * precision from about -87 and are 0, -Infinity, under -103): a token both sides put there is improbable alike, so
 * the two are compared at this floor. A model with sharp predictions (or random weights) scores such tokens.
 */
export const LLAMA_CPP_PRECISE_LOGPROB = -87;

/** |Δ| of two next-token log-probabilities, each raised to LLAMA_CPP_PRECISE_LOGPROB. */
export function logprobDifference(ours: number, theirs: number): number {
  return Math.abs(Math.max(ours, LLAMA_CPP_PRECISE_LOGPROB) - Math.max(theirs, LLAMA_CPP_PRECISE_LOGPROB));
}

/** KL(p ‖ q) from log-probabilities; llama.cpp's fp32 softmax gives -Infinity below ~-103, so q is floored there. */
function klDivergence(logP: ArrayLike<number>, logQ: ArrayLike<number>): number {
  let kl = 0;
  for (let i = 0; i < logP.length; i++) {
    const p = Math.exp(logP[i]);
    if (p === 0) continue;
    kl += p * (logP[i] - Math.max(logQ[i], -103));
  }
  return Math.max(0, kl);
}

export interface VerifyOptions {
  gguf: string;
  type: GgufFileType;
  /** The model and adapter the GGUF was made from (our engine scores these). */
  model: string;
  adapter: string | null;
  /** The run, for its held-out data. */
  run: string | null;
  /** A GGUF LoRA of `adapter` that llama.cpp applies to `gguf` (then a GGUF of `model` alone); `type` is the LoRA's. */
  lora?: string | null;
}

export async function verifyGguf(o: VerifyOptions): Promise<VerifyReport> {
  const tok = await loadModelTokenizer(o.model);
  const sequences = await sequencesToScore(tok, o.run);
  const engine = EngineModel.load(o.model);
  const problems: string[] = [];
  let tokens = 0, sumAbs = 0, maxAbs = 0, agree = 0, klSum = 0, confident = 0, confidentAgree = 0;
  const gguf = await openGguf(o.gguf, { f32Attention: true, ...(o.lora ? { lora: { file: o.lora } } : {}) });
  try {
    if (o.adapter !== null) engine.loadAdapter(o.adapter);
    const vocab = engine.config().vocabSize;
    if (gguf.vocabSize !== vocab) problems.push(`the GGUF has ${gguf.vocabSize} tokens, the model ${vocab}`);
    for (const ids of sequences) {
      if (ids.length < 2 || problems.length > 0) continue;
      const ours = engine.run({ ids: Int32Array.from(ids), batch: 1, seq: ids.length }, { logSoftmax: true }).logSoftmax!;
      const theirs = await gguf.scoreTokens(ids);
      for (let t = 0; t + 1 < ids.length; t++) {
        const row = ours.subarray(t * vocab, (t + 1) * vocab);
        const diff = logprobDifference(row[ids[t + 1]], theirs[t][ids[t + 1]]);
        sumAbs += diff;
        maxAbs = Math.max(maxAbs, diff);
        const top = argmax(row);
        const same = top === argmax(theirs[t]);
        if (same) agree++;
        if (row[top] >= Math.log(0.5)) {
          confident++;
          if (same) confidentAgree++;
        }
        klSum += klDivergence(row, theirs[t]);
        tokens++;
      }
    }
    // a merged finetune carries the fallback template where the model has none; a base GGUF (the --lora check's) its own
    const expectedTemplate = exportedChatTemplate(tok, o.adapter !== null && !o.lora);
    const promptTokensMatch = checkPromptTokens(tok, (text) => gguf.tokenize(text, { special: true }), gguf.chatTemplate, expectedTemplate, problems);
    const criterion = CRITERIA[o.type];
    if (tokens === 0) problems.push('no sequence of at least two tokens to score');
    else {
      // fewer than 10 confident positions (a model with flat predictions): the top token is noise, the KL decides
      const confidentTop1 = confident >= MIN_CONFIDENT_POSITIONS ? confidentAgree / confident : null;
      const failure = criterion.failure({ maxAbs, top1: agree / tokens, confidentTop1, meanKl: klSum / tokens });
      if (failure !== null) problems.push(failure);
    }
    return {
      verified: problems.length === 0,
      type: o.type,
      sequences: sequences.length,
      tokens,
      maxAbsLogprobDiff: maxAbs,
      meanAbsLogprobDiff: tokens ? sumAbs / tokens : 0,
      top1Agreement: tokens ? agree / tokens : 0,
      confidentTop1Agreement: confident ? confidentAgree / confident : tokens ? agree / tokens : 0,
      confidentPositions: confident,
      meanKl: tokens ? klSum / tokens : 0,
      promptTokensMatch,
      tolerance: criterion.text,
      problems,
    };
  } finally {
    engine.dispose();
    await gguf.close();
  }
}

/**
 * The GGUF's chat template must be ours, and llama.cpp's tokenizer must give our ids for a rendered conversation
 * (special-token text such as <|eot_id|> parsed into its id on both sides).
 */
function checkPromptTokens(
  tok: ModelTokenizer,
  llamaTokenize: (text: string) => number[],
  ggufTemplate: string | undefined,
  expectedTemplate: string | null,
  problems: string[],
): boolean {
  if ((ggufTemplate ?? null) !== expectedTemplate) {
    const expected = tok.chatTemplate !== null ? `the model's (${tok.chatTemplateFile})` : 'the Alpaca-style format this finetune was trained with (its model has none)';
    problems.push(
      ggufTemplate === undefined
        ? `the GGUF carries no chat template, where ${expected} belongs (a file exported before it was written: export it again)`
        : expectedTemplate === null
          ? 'the GGUF carries a chat template, and the model has none'
          : `the GGUF carries a different chat template from ${expected}`,
    );
    return false;
  }
  const conversation: { role: 'user' | 'assistant'; content: string }[] = [
    { role: 'user', content: 'What is the capital of France?' },
    { role: 'assistant', content: 'The capital of France is Paris.' },
    { role: 'user', content: 'And of Italy? Answer in 3 words, with digits 2024 and émojis 🙂.' },
  ];
  // rendered as training renders it (the model's template, or the fallback for models without one)
  const text = renderExample({ kind: 'chat', messages: conversation }, tok).segments.map((seg) => seg.text).join('');
  const ours = tok.encode(text);
  const theirs = llamaTokenize(text);
  const same = ours.length === theirs.length && ours.every((id, i) => id === theirs[i]);
  if (!same) {
    const at = ours.findIndex((id, i) => id !== theirs[i]);
    problems.push(`llama.cpp tokenizes a chat prompt differently from the model's tokenizer (first difference at token ${at < 0 ? Math.min(ours.length, theirs.length) : at})`);
  }
  return same;
}

/**
 * verifyGguf in a child process (the CLI's verify-gguf verb): llama.cpp runs in-process in node-llama-cpp, and a
 * malformed file can hit one of its assertions and abort the whole process; here that becomes a failed check.
 */
export async function verifyGgufInChild(o: VerifyOptions, cli: { execPath: string; cliPath: string }): Promise<VerifyReport> {
  const args = [cli.cliPath, 'verify-gguf', '--gguf', o.gguf, '--type', o.type, '--model', o.model, '--json'];
  if (o.adapter !== null) args.push('--adapter', o.adapter);
  if (o.run !== null) args.push('--run', o.run);
  if (o.lora) args.push('--lora', o.lora);
  const { code, signal, stdout, stderr } = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve, reject) => {
    const child = spawn(cli.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    child.on('error', reject);
    child.on('close', (c, s) => resolve({ code: c, signal: s, stdout: out, stderr: err }));
  });
  const line = stdout.trim().split('\n').pop() ?? '';
  if (code === 0 && line.startsWith('{')) return JSON.parse(line) as VerifyReport;
  const tail = stderr.trim().split('\n').slice(-3).join(' / ');
  if (code !== 0 && code !== null && !signal) throw new Error(tail || `verify-gguf exited with code ${code}`);
  return {
    verified: false, type: o.type, sequences: 0, tokens: 0, maxAbsLogprobDiff: NaN, meanAbsLogprobDiff: NaN, top1Agreement: 0,
    confidentTop1Agreement: 0, confidentPositions: 0, meanKl: NaN, promptTokensMatch: false, tolerance: CRITERIA[o.type].text,
    problems: [`llama.cpp crashed on the file (${signal ?? `exit code ${code}`})${tail ? `: ${tail}` : ''}`],
  };
}
