import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { packageRoot } from '../../extension/engine/addon';

export const repoRoot = packageRoot(__dirname);
export const fixtures = path.join(repoRoot, 'test', 'fixtures');
export const reference = (name: string) => path.join(fixtures, 'reference', name);
export const cliPath = path.join(repoRoot, 'dist', 'cli.js');

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `qlora-${prefix}-`));
}
