// Where a command is on the PATH (no shell involved), as the OS would find it; PATHEXT on Windows.
import * as fs from 'node:fs';
import * as path from 'node:path';

/** The executable `command` on the PATH (PATHEXT extensions on Windows), or null; looked up without a shell. */
export function findOnPath(command: string, env: NodeJS.ProcessEnv = process.env): string | null {
  const dirs = (env.PATH ?? env.Path ?? '').split(path.delimiter).filter((d) => d !== '');
  const extensions = process.platform === 'win32' ? ['', ...(env.PATHEXT ?? '.EXE;.CMD;.BAT').split(';').filter((e) => e !== '')] : [''];
  for (const dir of dirs) {
    for (const ext of extensions) {
      const file = path.join(dir, command + ext);
      try {
        if (!fs.statSync(file).isFile()) continue;
        fs.accessSync(file, fs.constants.X_OK);
        return file;
      } catch {
        // not there, or not executable
      }
    }
  }
  return null;
}
