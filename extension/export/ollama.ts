// export-ollama: a run's merged model as a folder Ollama imports with `ollama create NAME -f DIR/Modelfile`:
// model.gguf (export-gguf's file, checked in llama.cpp) and a Modelfile whose TEMPLATE renders conversations exactly as
// the model's chat template does (ollamaTemplate.ts), whose stops end generation at the end-of-turn token, and whose
// SYSTEM is the system message the training data gave every conversation, when it did. The folder is written under
// a temporary name beside `out` and renamed once complete, so a refusal or failure leaves nothing under `out`.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { findOnPath } from '../util/findOnPath';
import * as path from 'node:path';
import { loadModelTokenizer, readDataset } from '../data';
import type { TrainConfig } from '../trainer/config';
import { runModelDir } from '../trainer/verbs/export';
import { removeStaleTemps } from '../util/staleTemp';
import { syncFolder, writeFileAtomic } from '../util/atomicFile';
import { assertEmptyOrAbsent, removeEmptyFolder, renameFolder } from '../util/atomicFolder';
import { exportGguf, type ExportGgufOptions, type ExportGgufReport } from './exportGguf';
import type { GgufFileType } from './gguf/types';
import { modelfileParameterHolds, modelfileTripleQuotedHolds, ollamaTemplate, type ChatFamily } from './ollamaTemplate';
import { readJsonFile } from '../util/jsonFile';
import { shellLine } from '../util/shellLine';

export interface ExportOllamaOptions {
  run: string;
  /** A checkpoint step's adapter instead of the final one. */
  checkpoint?: number;
  /** The folder to write (must not exist, or be empty). */
  out: string;
  type: GgufFileType;
  /** The Ollama model name for the create command; default: the run folder's name. */
  name?: string;
  /** Run llama.cpp's check of the GGUF in a child process of this CLI. */
  cli?: ExportGgufOptions['cli'];
  onProgress?: ExportGgufOptions['onProgress'];
}

export interface ExportOllamaReport {
  out: string;
  modelfile: string;
  gguf: ExportGgufReport;
  family: ChatFamily;
  templateSource: 'chat_template' | 'alpaca-fallback';
  endOfTurn: string;
  stops: string[];
  /** The Modelfile's SYSTEM, or null (and why, in systemNote). */
  system: string | null;
  systemNote: string;
  name: string;
  /** `ollama create NAME -f DIR/Modelfile` as an argument list. */
  createCommand: string[];
}

// Ollama's model names (types/model/name.go, isValidPart): [namespace/]model[:tag], each part 1-80 characters,
// starting with a letter, digit or underscore, then also "-" and "." ("." not in the namespace).
const NAME_PATTERN = /^(?:[A-Za-z0-9_][A-Za-z0-9_-]{0,79}\/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,79})?$/;

export function checkOllamaName(name: string): void {
  if (!NAME_PATTERN.test(name)) {
    throw new Error(`"${name}" is not a valid Ollama model name ([namespace/]model[:tag]: letters, digits, "_", "-" and ".", starting with a letter, digit or "_")`);
  }
}

/** A valid Ollama model name made from a folder name: lower case, other characters replaced by "-". */
export function defaultOllamaName(folder: string): string {
  const name = path.basename(path.resolve(folder)).toLowerCase().replace(/[^a-z0-9_.-]+/g, '-').replace(/^[^a-z0-9_]+/, '').slice(0, 80);
  return name === '' ? 'qlora-model' : name;
}

/**
 * The system message every conversation of the run's training data starts with, when they all share one. Completion
 * and text data, mixed or absent system messages, or a data file no longer there give null, with the reason.
 */
export async function sharedSystemMessage(run: string): Promise<{ system: string | null; note: string }> {
  const config = readJsonFile(path.join(run, 'config.json')) as Partial<TrainConfig>;
  if (typeof config.data !== 'string' || !fs.existsSync(config.data)) return { system: null, note: `the training data (${config.data ?? 'unnamed'}) is not there to read` };
  let ds: Awaited<ReturnType<typeof readDataset>>;
  try {
    ds = await readDataset(config.data, { shape: config.shape ?? undefined });
  } catch (err) {
    return { system: null, note: `the training data could not be read (${(err as Error).message})` };
  }
  const chats = ds.examples.flatMap((e) => (e.kind === 'chat' ? [e.messages] : []));
  if (chats.length === 0) return { system: null, note: 'the training data has no conversations' };
  const first = chats[0][0];
  if (first?.role !== 'system') return { system: null, note: 'the training conversations have no common system message' };
  const shared = chats.every((m) => m[0]?.role === 'system' && m[0].content === first.content);
  if (!shared) return { system: null, note: 'the training conversations have no common system message' };
  if (!modelfileTripleQuotedHolds(first.content)) {
    return { system: null, note: 'the training conversations share a system message that a Modelfile cannot hold (it contains """ or non-printable characters); set it in Ollama with /set system' };
  }
  return { system: first.content, note: `every training conversation starts with this system message (${chats.length} conversations)` };
}

/** A PARAMETER value in Modelfile quoting (parser/parser.go unquote: "..." or """...""", taken as written). */
function quoteParameter(value: string): string {
  if (!modelfileParameterHolds(value)) throw new Error(`a Modelfile cannot hold the parameter value ${JSON.stringify(value)}`);
  return value.includes('"') ? `"""${value}"""` : `"${value}"`;
}

export function modelfileText(o: { template: string; stops: readonly string[]; system: string | null }): string {
  const lines = ['FROM ./model.gguf', `TEMPLATE """${o.template}"""`, ...o.stops.map((s) => `PARAMETER stop ${quoteParameter(s)}`)];
  if (o.system !== null) lines.push(`SYSTEM """${o.system}"""`);
  return lines.join('\n') + '\n';
}

export async function exportOllama(o: ExportOllamaOptions): Promise<ExportOllamaReport> {
  const target = path.resolve(o.out);
  assertEmptyOrAbsent(o.out);
  const name = o.name ?? defaultOllamaName(o.run);
  checkOllamaName(name);
  const model = runModelDir(o.run);
  // the template is worked out (or refused) before the long merge and GGUF write
  const template = ollamaTemplate(await loadModelTokenizer(model));
  const { system, note } = await sharedSystemMessage(o.run);
  const systemNote = system !== null && !template.supportsSystem ? `${note}, but the chat template has no place for a system message: left out` : note;
  const modelfile = modelfileText({ template: template.template, stops: template.stops, system: template.supportsSystem ? system : null });

  fs.mkdirSync(path.dirname(target), { recursive: true });
  removeStaleTemps(target, 'tmp'); // what a killed export left behind
  const tmp = `${target}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true }); // a leftover of an earlier run of this same pid
  fs.mkdirSync(tmp);
  let gguf: ExportGgufReport;
  try {
    gguf = await exportGguf({ run: o.run, checkpoint: o.checkpoint, out: path.join(tmp, 'model.gguf'), type: o.type, cli: o.cli, onProgress: o.onProgress });
    const v = gguf.verification!;
    if (!v.verified) throw new Error(`llama.cpp's check of the GGUF failed, so no Ollama folder was written: ${v.problems.join('; ')}`);
    writeFileAtomic(path.join(tmp, 'Modelfile'), modelfile);
    removeEmptyFolder(target); // empty (checked above); rename cannot replace a folder everywhere
    renameFolder(tmp, target);
    syncFolder(path.dirname(target));
  } catch (err) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  const modelfilePath = path.join(target, 'Modelfile');
  return {
    out: target,
    modelfile: modelfilePath,
    gguf: { ...gguf, file: path.join(target, 'model.gguf') },
    family: template.family,
    templateSource: template.source,
    endOfTurn: template.endOfTurn,
    stops: template.stops,
    system: template.supportsSystem ? system : null,
    systemNote,
    name,
    createCommand: ['ollama', 'create', name, '-f', modelfilePath],
  };
}



/** Runs `ollama create` (argument array, no shell); its output goes to `output`. Rejects on a non-zero exit. */
export function runOllamaCreate(ollama: string, report: Pick<ExportOllamaReport, 'createCommand'>, output: 'inherit' | 'stderr'): Promise<void> {
  const args = report.createCommand.slice(1);
  return new Promise((resolve, reject) => {
    const child = spawn(ollama, args, { stdio: ['ignore', output === 'inherit' ? 'inherit' : process.stderr, 'inherit'] });
    child.on('error', (err) => reject(new Error(`could not run ${ollama}: ${err.message}`)));
    child.on('close', (code, signal) => {
      if (code === 0) resolve();
      else reject(new Error(`"${shellLine(report.createCommand)}" failed (${signal !== null ? `signal ${signal}` : `exit status ${code}`}); the folder is complete, so the command can be run again once Ollama works`));
    });
  });
}

export { findOnPath };
