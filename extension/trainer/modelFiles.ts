// The files of a model folder besides its weights and config.json (tokenizer files, chat template, generation
// config, README), which a verb that rewrites the weights (merge, quantize) copies as they are.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isFile } from '../util/isFolder';

/** Weights and their index: the verb writes its own. */
function isWeightFile(name: string): boolean {
  return name.endsWith('.safetensors') || name === 'model.safetensors.index.json' || name.endsWith('.bin') || name.endsWith('.pt');
}

/**
 * Copies the files of `model` but config.json and the weights into `out`; returns their names. A Hugging Face cache
 * snapshot's files are links to its blobs: what they link to is copied.
 */
export function copyModelSideFiles(model: string, out: string): string[] {
  const copied: string[] = [];
  for (const name of fs.readdirSync(model)) {
    if (!isFile(path.join(model, name)) || name === 'config.json' || isWeightFile(name)) continue;
    fs.copyFileSync(path.join(model, name), path.join(out, name));
    copied.push(name);
  }
  return copied;
}
