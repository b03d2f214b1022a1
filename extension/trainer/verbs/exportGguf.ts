// export-gguf verb: the CLI face of extension/export/exportGguf.ts.
import { exportGguf, GGUF_FILE_TYPES } from '../../export/exportGguf';
import { LORA_GGUF_TYPES } from '../../export/gguf/loraGguf';
import { verifyGguf, type VerifyReport } from '../../export/verifyGguf';
import type { GgufFileType } from '../../export/gguf/types';
import { integerOption, requiredString, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { adapterFlag } from './export';

export const exportGgufOptions: Record<string, OptionSpec> = {
  run: { type: 'string', description: 'a run folder: its base model merged with its adapter' },
  checkpoint: { type: 'string', description: "with --run: a checkpoint step's adapter instead of the final one" },
  model: { type: 'string', description: 'or a Hugging Face model folder (plain, or bnb-4bit with --adapter)' },
  adapter: { type: 'string', description: 'with --model: a PEFT LoRA adapter to merge in' },
  out: { type: 'string', required: true, description: 'the .gguf file to write' },
  type: { type: 'string', description: `tensor type: ${GGUF_FILE_TYPES.join(', ')} (default f16; with --lora-only ${LORA_GGUF_TYPES.join(', ')})` },
  'lora-only': { type: 'boolean', description: "the adapter alone as a GGUF LoRA, for llama.cpp's --lora on a GGUF of the base" },
  'no-verify': { type: 'boolean', description: 'skip the check of the file in llama.cpp against the engine' },
  json: { type: 'boolean', description: 'print a JSON report; exit 0 once the file is written (its verification.verified says how the check went)' },
};

export async function exportGgufVerb(o: ParsedOptions): Promise<void> {
  const type = (stringOption(o, 'type') ?? 'f16').toLowerCase();
  if (!(GGUF_FILE_TYPES as readonly string[]).includes(type)) throw new UsageError(`--type must be one of ${GGUF_FILE_TYPES.join(', ')}, got '${type}'`);
  const loraOnly = Boolean(o['lora-only']);
  if (loraOnly && !(LORA_GGUF_TYPES as readonly string[]).includes(type)) throw new UsageError(`--type must be one of ${LORA_GGUF_TYPES.join(', ')} with --lora-only, got '${type}'`);
  const json = Boolean(o.json);
  let lastTenth = -1;
  const report = await exportGguf({
    run: stringOption(o, 'run'),
    checkpoint: stringOption(o, 'checkpoint') === undefined ? undefined : integerOption(o, 'checkpoint', 0),
    model: stringOption(o, 'model'),
    adapter: adapterFlag(o, { runFlag: true }),
    out: requiredString(o, 'out'),
    type: type as GgufFileType,
    verify: !o['no-verify'],
    loraOnly,
    cli: { execPath: process.execPath, cliPath: process.argv[1] },
    onProgress(phase, done, total) {
      if (phase === 'verify') {
        if (done === 0) process.stderr.write('checking the file in llama.cpp against the engine...\n');
        return;
      }
      if (phase === 'merge') {
        if (done === 0) process.stderr.write('planning the merge of the adapter into the base (each tensor is merged in float32 as it is written)...\n');
        return;
      }
      if (phase === 'base') {
        if (done === 0) process.stderr.write('writing a temporary f16 GGUF of the base for the check...\n');
        return;
      }
      const tenth = Math.floor((10 * done) / total); // a line per tenth of the tensors
      if (tenth !== lastTenth) process.stderr.write(`writing tensors: ${done}/${total}\n`);
      lastTenth = tenth;
    },
  });
  if (json) {
    process.stdout.write(JSON.stringify(report) + '\n');
    return;
  }
  const types = Object.entries(report.types).map(([t, n]) => `${n} ${t}`).join(', ');
  process.stdout.write(`wrote ${report.file}: ${report.architecture}${loraOnly ? ' LoRA adapter' : ''}, ${report.tensors} tensors (${types}), ${(report.bytes / 1048576).toFixed(2)} MiB\n`);
  if (report.verification !== null) printVerification(report.verification);
}

/** The llama.cpp check's verdict and figures, and each problem on its own line; exit status 1 when it failed. */
function printVerification(v: VerifyReport): void {
  const confident = v.confidentPositions > 0 ? `${(100 * v.confidentTop1Agreement).toFixed(1)}% at the ${v.confidentPositions} confident positions` : 'no confident positions: judged by the KL';
  const figures =
    `${v.tokens} tokens of ${v.sequences} sequences: max |Δ log-prob| ${v.maxAbsLogprobDiff.toFixed(4)}, mean ${v.meanAbsLogprobDiff.toFixed(4)}, ` +
    `top-1 agreement ${(100 * v.top1Agreement).toFixed(1)}% (${confident}), mean KL ${v.meanKl.toExponential(2)}; chat prompt tokens ${v.promptTokensMatch ? 'match' : 'DIFFER'}`;
  process.stdout.write(`${v.verified ? 'verified' : 'NOT verified'} in llama.cpp (${v.tolerance}): ${figures}\n`);
  if (v.verified) return;
  for (const p of v.problems) process.stdout.write(`  ${p}\n`);
  process.exitCode = 1;
}

export const verifyGgufOptions: Record<string, OptionSpec> = {
  gguf: { type: 'string', required: true, description: 'the GGUF file to check' },
  type: { type: 'string', required: true, description: `its type: ${GGUF_FILE_TYPES.join(', ')}` },
  model: { type: 'string', required: true, description: 'the model folder it was made from' },
  adapter: { type: 'string', description: 'the adapter merged into it' },
  run: { type: 'string', description: 'the run whose held-out data to score' },
  lora: { type: 'string', description: "a GGUF LoRA of --adapter applied to --gguf (then the base's GGUF); --type is the LoRA's" },
  json: { type: 'boolean', description: 'print the report as JSON' },
};

/** verify-gguf: the llama.cpp check alone (export-gguf runs it in a child process). */
export async function verifyGgufVerb(o: ParsedOptions): Promise<void> {
  const type = requiredString(o, 'type');
  if (!(GGUF_FILE_TYPES as readonly string[]).includes(type)) throw new UsageError(`--type must be one of ${GGUF_FILE_TYPES.join(', ')}, got '${type}'`);
  const r = await verifyGguf({
    gguf: requiredString(o, 'gguf'), type: type as GgufFileType, model: requiredString(o, 'model'),
    adapter: stringOption(o, 'adapter') ?? null, run: stringOption(o, 'run') ?? null, lora: stringOption(o, 'lora') ?? null,
  });
  if (o.json) process.stdout.write(JSON.stringify(r) + '\n');
  else printVerification(r);
}
