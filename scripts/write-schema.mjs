// Regenerates schemas/train-config.schema.json from extension/trainer/config.ts (run after `tsc -p .`).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const { trainConfigSchema } = createRequire(import.meta.url)(path.join(root, 'out', 'extension', 'trainer', 'config.js'));
fs.mkdirSync(path.join(root, 'schemas'), { recursive: true });
fs.writeFileSync(path.join(root, 'schemas', 'train-config.schema.json'), JSON.stringify(trainConfigSchema(), null, 2) + '\n');
