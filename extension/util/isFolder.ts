// Whether a path names a folder (false when it names nothing or a file).
import * as fs from 'node:fs';

export function isFolder(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}
