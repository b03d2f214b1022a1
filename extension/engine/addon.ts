// Finds and loads the native addon. Only the trainer process (and tests) load it: the extension host never does,
// so a native crash cannot take the editor down.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { NativeAddon } from './native';

/** The package root: the nearest ancestor of this file holding our package.json (works from out/ and dist/). */
export function packageRoot(start: string = __dirname): string {
  let dir = start;
  for (;;) {
    const manifest = path.join(dir, 'package.json');
    if (fs.existsSync(manifest)) {
      try {
        if (JSON.parse(fs.readFileSync(manifest, 'utf8')).name === 'qlora-studio') return dir;
      } catch {
        // not ours; keep looking
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error(`cannot find the qlora-studio package root above ${start}`);
    dir = parent;
  }
}

/** Where the addon lives: QLORA_STUDIO_ADDON overrides; otherwise the cmake-js build output. */
export function addonPath(): string {
  return process.env.QLORA_STUDIO_ADDON ?? path.join(packageRoot(), 'build', 'Release', 'qlora_native.node');
}

let cached: NativeAddon | undefined;

export function loadAddon(): NativeAddon {
  if (cached) return cached;
  const file = addonPath();
  if (!fs.existsSync(file)) {
    throw new Error(`the QLoRA engine is not built (${file} is missing); run "npm ci" or "npm run build:native"`);
  }
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  cached = require(file) as NativeAddon;
  return cached;
}
