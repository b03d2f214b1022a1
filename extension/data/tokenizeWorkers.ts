/**
 * Tokenizing a large dataset in worker threads: rendering and tokenizing cost about a millisecond an example in
 * JavaScript, so a dataset of hundreds of thousands of rows takes minutes on one core at every start and resume.
 * The examples are cut into one contiguous share per worker; each worker loads the model's tokenizer itself and sends
 * back its share's outcomes in order, with its count now and then for progress.
 *
 * The worker runs this very file: `out/extension/data/tokenizeWorkers.js` under tests, and the bundle it is part of
 * (dist/cli.js) in the trainer, whose command line does not run in a worker thread (cli.ts).
 */
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { loadModelTokenizer } from './modelTokenizer';
import type { RenderOptions } from './render';
import type { NormalizedExample } from './shapes';
import { TokenizationStopped, tokenizeOutcome, type ExampleOutcome } from './tokenize';

const WORKER_KIND = 'qlora-studio-tokenize';

interface Share {
  kind: typeof WORKER_KIND;
  modelDir: string;
  options: RenderOptions;
  examples: NormalizedExample[];
}

type WorkerMessage = { done: number } | { outcomes: ExampleOutcome[] } | { failed: string };

/** Outcomes sent every this many examples. */
const PROGRESS_EVERY = 256;

export async function tokenizeInWorkers(
  examples: readonly NormalizedExample[],
  modelDir: string,
  options: RenderOptions,
  workers: number,
  onProgress?: (done: number, total: number) => void,
  signal?: AbortSignal,
): Promise<ExampleOutcome[]> {
  const count = Math.max(1, Math.min(workers, examples.length));
  const size = Math.ceil(examples.length / count);
  const done = new Array<number>(count).fill(0);
  const report = () => onProgress?.(done.reduce((a, b) => a + b, 0), examples.length);
  const shares = Array.from({ length: count }, (_, w) => examples.slice(w * size, (w + 1) * size));
  const started: Worker[] = [];
  try {
    const results = await Promise.all(
      shares.map(
        (share, w) =>
          new Promise<ExampleOutcome[]>((resolve, reject) => {
            const data: Share = { kind: WORKER_KIND, modelDir, options, examples: share };
            const worker = new Worker(__filename, { workerData: data });
            started.push(worker);
            worker.on('message', (m: WorkerMessage) => {
              if ('done' in m) {
                done[w] = m.done;
                report();
              } else if ('failed' in m) {
                reject(new Error(m.failed));
              } else {
                done[w] = share.length; // reported with the next count, or the last one (collectTokenized's)
                resolve(m.outcomes);
              }
            });
            worker.on('error', reject);
            worker.on('exit', (code) => reject(new Error(`a tokenizing worker stopped (exit code ${code}) before it was done`)));
            // a stop asked for meanwhile: the workers are ended below
            if (signal?.aborted) reject(new TokenizationStopped());
            signal?.addEventListener('abort', () => reject(new TokenizationStopped()), { once: true });
          }),
      ),
    );
    return results.flat();
  } finally {
    // a failed share ends the others, which would only be waited for
    for (const worker of started) void worker.terminate();
  }
}

async function tokenizeShare(share: Share): Promise<void> {
  const port = parentPort!;
  try {
    const tok = await loadModelTokenizer(share.modelDir);
    // copied, not moved: a transfer list of two buffers an example costs time growing with its square (a review
    // measured 11.9 s to post 120,000 examples with one, 1.2 s copied)
    const outcomes: ExampleOutcome[] = [];
    share.examples.forEach((example, i) => {
      outcomes.push(tokenizeOutcome(example, tok, share.options));
      if ((i + 1) % PROGRESS_EVERY === 0) port.postMessage({ done: i + 1 } satisfies WorkerMessage);
    });
    port.postMessage({ outcomes } satisfies WorkerMessage);
  } catch (err) {
    port.postMessage({ failed: err instanceof Error ? err.message : String(err) } satisfies WorkerMessage);
  }
}

// Last, so that every module this one needs is loaded when a worker starts on its share.
if (!isMainThread && (workerData as Share | undefined)?.kind === WORKER_KIND) void tokenizeShare(workerData as Share);
