// Copies out of a folder someone else may have made (a model from the Hub, a cloned repository's runs) following
// links only where they stay inside it. A link to a file elsewhere (`README.md -> ~/.ssh/id_rsa`) would otherwise put
// that file into an export or a merged model, which users upload. A Hugging Face cache snapshot's files are links to
// its repository's blobs, which count as inside.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isFolder } from './isFolder';

/**
 * The folder whose inside a link in `folder` may lead to: the folder itself, or for a Hugging Face cache snapshot
 * (`models--<org>--<name>/snapshots/<revision>`, beside the repository's `blobs/`) the repository folder.
 */
export function linkRoot(folder: string): string {
  const resolved = realPathOr(path.resolve(folder)); // a folder that is itself a link to a snapshot is that snapshot
  const repo = path.dirname(path.dirname(resolved));
  const snapshot = path.basename(path.dirname(resolved)) === 'snapshots' && /^(models|datasets)--/.test(path.basename(repo)) && isFolder(path.join(repo, 'blobs'));
  return snapshot ? realPathOr(repo) : resolved;
}

/** Whether `p`, its links followed, is inside `root` (a real path, as linkRoot gives). */
export function staysInside(p: string, root: string): boolean {
  let real: string;
  try {
    real = fs.realpathSync(p);
  } catch {
    return false; // a dangling link
  }
  return isInsideFolder(real, root);
}

/** Whether the path `p` is `folder` or inside it (both absolute and resolved; no links followed). */
export function isInsideFolder(p: string, folder: string): boolean {
  const rel = path.relative(folder, p);
  return rel === '' || (rel !== '..' && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel));
}

/** "<p> is a link that leads outside <root> (to <target>)". */
export function leadsOutside(p: string, root: string): string {
  let target: string;
  try {
    target = `to ${fs.realpathSync(p)}`;
  } catch {
    target = 'to nothing';
  }
  return `${p} is a link that leads outside ${root} (${target})`;
}

/**
 * Copies the file or folder `src` to `dest` (a folder's content into `dest`, made where missing), following links
 * only where they stay inside `root`; returns a sentence for each link left out. Anything but files and folders
 * (sockets, pipes) is left out too.
 */
export function copyContained(src: string, dest: string, root: string): string[] {
  const skipped: string[] = [];
  const folders = new Set<string>(); // real paths of the folders being copied: a link back to one would never end
  const copy = (from: string, to: string) => {
    if (fs.lstatSync(from).isSymbolicLink() && !staysInside(from, root)) {
      skipped.push(`${leadsOutside(from, root)}; it was not copied`);
      return;
    }
    const stat = fs.statSync(from);
    if (stat.isDirectory()) {
      const real = fs.realpathSync(from);
      if (folders.has(real)) {
        skipped.push(`${from} is a link to a folder that holds it; it was not copied`);
        return;
      }
      folders.add(real);
      fs.mkdirSync(to, { recursive: true });
      for (const name of fs.readdirSync(from)) copy(path.join(from, name), path.join(to, name));
      folders.delete(real);
    } else if (stat.isFile()) {
      fs.copyFileSync(from, to);
    } else {
      skipped.push(`${from} is neither a file nor a folder; it was not copied`);
    }
  };
  copy(src, dest);
  return skipped;
}

/** The real path of `p`, or `p` where it does not exist. */
export function realPathOr(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return p;
  }
}
