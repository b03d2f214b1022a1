// The files of a model folder besides its weights and config.json (tokenizer files, chat template, generation
// config, README), which a verb that rewrites the weights (merge, quantize) copies as they are.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { copyContained, linkRoot } from '../util/containedCopy';
import { isFile } from '../util/isFolder';

/** Weights and their index: the verb writes its own. */
function isWeightFile(name: string): boolean {
  return name.endsWith('.safetensors') || name === 'model.safetensors.index.json' || name.endsWith('.bin') || name.endsWith('.pt');
}

/**
 * Copies the files of `model` but config.json and the weights into `out`. A Hugging Face cache snapshot's files are
 * links to its blobs: what they link to is copied; a link that leads outside the model folder is not (notCopied says
 * which), lest a file from elsewhere end up in a model the user shares.
 */
export function copyModelSideFiles(model: string, out: string): { copied: string[]; notCopied: string[] } {
  const copied: string[] = [];
  const notCopied: string[] = [];
  const root = linkRoot(model);
  for (const name of fs.readdirSync(model)) {
    const file = path.join(model, name);
    if (!isFile(file) || name === 'config.json' || isWeightFile(name)) continue;
    const skipped = copyContained(file, path.join(out, name), root);
    if (skipped.length === 0) copied.push(name);
    notCopied.push(...skipped);
  }
  return { copied, notCopied };
}
