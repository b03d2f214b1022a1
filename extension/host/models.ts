// Model folders for the model picker: what a Hugging Face folder holds (architecture, size on disk, 4-bit or not,
// read from its config.json) and where the Hugging Face cache keeps its snapshots. Pure Node, unit-tested.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expandHome } from '../util/homePath';

export interface ModelDescription {
  dir: string;
  /** "org/name" for a cache snapshot, else the folder name. */
  name: string;
  architecture: string;
  /** Bytes of its *.safetensors files (the blobs a cache snapshot links to). */
  bytes: number;
  /** A bitsandbytes 4-bit checkpoint (quantization_config with load_in_4bit or an NF4/FP4 quant type). */
  fourBit: boolean;
}

function safetensorsFiles(dir: string): string[] {
  try {
    return fs.readdirSync(dir).filter((n) => n.endsWith('.safetensors'));
  } catch {
    return [];
  }
}

export function isModelFolder(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'config.json')) && safetensorsFiles(dir).length > 0;
}

export function isFourBit(config: Record<string, unknown>): boolean {
  const q = config.quantization_config;
  if (typeof q !== 'object' || q === null) return false;
  const qc = q as Record<string, unknown>;
  return qc.load_in_4bit === true || qc.bnb_4bit_quant_type === 'nf4' || qc.bnb_4bit_quant_type === 'fp4';
}

/** Describes a model folder; undefined when it is not one (no config.json, no safetensors, unreadable config). */
export function describeModelFolder(dir: string, name: string = path.basename(dir)): ModelDescription | undefined {
  const files = safetensorsFiles(dir);
  if (files.length === 0) return undefined;
  let config: Record<string, unknown>;
  try {
    const parsed: unknown = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return undefined;
    config = parsed as Record<string, unknown>;
  } catch {
    return undefined;
  }
  const architectures = config.architectures;
  const architecture =
    Array.isArray(architectures) && typeof architectures[0] === 'string'
      ? architectures[0]
      : typeof config.model_type === 'string'
        ? config.model_type
        : 'unknown architecture';
  let bytes = 0;
  for (const f of files) {
    try {
      bytes += fs.statSync(path.join(dir, f)).size; // follows the cache's symlinks to the blobs
    } catch {
      // a dangling link in a half-downloaded snapshot counts as nothing
    }
  }
  return { dir, name, architecture, bytes, fourBit: isFourBit(config) };
}

/** The hub cache: the setting, else $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub (as huggingface_hub). */
export function huggingFaceHubDirectory(setting: string, env: NodeJS.ProcessEnv = process.env, home: string = os.homedir()): string {
  if (setting.trim() !== '') return expandHome(setting.trim(), home);
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  if (env.HF_HOME) return path.join(env.HF_HOME, 'hub');
  return path.join(home, '.cache', 'huggingface', 'hub');
}

/** Model snapshots in a hub cache (models--org--name/snapshots/<revision>) that hold a loadable model. */
export function listHubSnapshots(hubDir: string): ModelDescription[] {
  let repos: string[];
  try {
    repos = fs.readdirSync(hubDir).filter((n) => n.startsWith('models--'));
  } catch {
    return [];
  }
  const found: ModelDescription[] = [];
  for (const repo of repos) {
    const repoName = repo.slice('models--'.length).split('--').join('/');
    const snapshots = path.join(hubDir, repo, 'snapshots');
    let revisions: string[];
    try {
      revisions = fs.readdirSync(snapshots);
    } catch {
      continue;
    }
    for (const revision of revisions) {
      const label = revisions.length > 1 ? `${repoName}@${revision.slice(0, 7)}` : repoName;
      const description = describeModelFolder(path.join(snapshots, revision), label);
      if (description) found.push(description);
    }
  }
  return found.sort((a, b) => a.name.localeCompare(b.name));
}
