// Whether a path names a folder, or a file (false when it names nothing, or the other). Links are followed: a
// Hugging Face cache snapshot holds its files as links to blobs.
import * as fs from 'node:fs';

export function isFolder(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

export function isFile(p: string): boolean {
  try {
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}
