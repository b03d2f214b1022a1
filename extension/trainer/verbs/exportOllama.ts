// export-ollama verb: the CLI face of extension/export/ollama.ts.
import { GGUF_FILE_TYPES } from '../../export/exportGguf';
import type { GgufFileType } from '../../export/gguf/types';
import { checkOllamaName, exportOllama, findOnPath, runOllamaCreate } from '../../export/ollama';
import { shellLine } from '../../util/shellLine';
import { print } from '../cliOutput';
import { integerOption, requiredString, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';

export const exportOllamaOptions: Record<string, OptionSpec> = {
  run: { type: 'string', required: true, description: 'the run folder: its base model merged with its adapter' },
  out: { type: 'string', required: true, description: 'the folder to write (model.gguf and Modelfile); must not exist or be empty' },
  type: { type: 'string', description: `GGUF tensor type: ${GGUF_FILE_TYPES.join(', ')} (default q4_k_m, what Ollama's library models use)` },
  checkpoint: { type: 'string', description: "a checkpoint step's adapter instead of the final one" },
  name: { type: 'string', description: 'the Ollama model name for "ollama create" (default: the run folder\'s name)' },
  create: { type: 'boolean', description: 'run "ollama create" once the folder is written (needs ollama on the PATH)' },
  json: { type: 'boolean', description: 'print a JSON report' },
};

export async function exportOllamaVerb(o: ParsedOptions): Promise<void> {
  const type = (stringOption(o, 'type') ?? 'q4_k_m').toLowerCase();
  if (!(GGUF_FILE_TYPES as readonly string[]).includes(type)) throw new UsageError(`--type must be one of ${GGUF_FILE_TYPES.join(', ')}, got '${type}'`);
  const name = stringOption(o, 'name');
  if (name !== undefined) checkOllamaName(name);
  const json = Boolean(o.json);
  // checked before the export, so a missing ollama does not cost a merge and a GGUF write first
  const ollama = findOnPath('ollama');
  if (o.create && ollama === null) throw new Error('--create needs the ollama command on the PATH, and it is not there; install Ollama or leave out --create and run the printed command later');
  // progress goes to stderr in both modes (the extension shows it while the JSON report waits on stdout)
  const say = (line: string) => process.stderr.write(line + '\n');
  const report = await exportOllama({
    run: requiredString(o, 'run'),
    out: requiredString(o, 'out'),
    type: type as GgufFileType,
    checkpoint: stringOption(o, 'checkpoint') === undefined ? undefined : integerOption(o, 'checkpoint', 0),
    name,
    cli: { execPath: process.execPath, cliPath: process.argv[1] },
    onProgress(phase, done) {
      if (done !== 0) return;
      if (phase === 'merge') say('planning the merge of the adapter into the base (each tensor is merged in float32 as it is written)...');
      else if (phase === 'write') say('writing model.gguf...');
      else if (phase === 'verify') say('checking model.gguf in llama.cpp against the engine...');
    },
  });
  if (o.create) await runOllamaCreate(ollama!, report, json ? 'stderr' : 'inherit');
  if (json) {
    process.stdout.write(JSON.stringify({ ...report, created: Boolean(o.create) }) + '\n');
    return;
  }
  const v = report.gguf.verification!;
  print(`wrote ${report.out}: model.gguf (${type}, ${(report.gguf.bytes / 1048576).toFixed(2)} MiB, verified in llama.cpp: top-1 agreement ${(100 * v.top1Agreement).toFixed(1)}%) and Modelfile`);
  print(`  template: ${report.family} (from the model's ${report.templateSource === 'chat_template' ? 'chat template' : 'Alpaca-style fallback format'}), stops at ${report.stops.join(' ')}`);
  print(`  system: ${report.system === null ? `none (${report.systemNote})` : JSON.stringify(report.system)}`);
  if (o.create) print(`created the Ollama model ${report.name}; try: ollama run ${report.name}`);
  else {
    print(`import it into Ollama with:\n  ${shellLine(report.createCommand)}`);
    if (ollama !== null) print('(ollama is on the PATH: with --create, export-ollama runs this itself)');
  }
}
