// A run's tokenized data, kept in its folder so that a resume, the chat panel's prompts and the GGUF check do not
// tokenize the dataset again: about 1 ms an example (a million rows is a quarter of an hour of one core). It is keyed
// on what the tokenization depends on (the data file's bytes, the model's tokenizer files, the settings that shape
// it, and the version of the code's tokenization), so an edited dataset or tokenizer is tokenized afresh, as before.
// A cache that is missing, damaged or of another key is ignored; it is never the only copy of anything.
//
// File layout (little-endian): the magic "QLTOKEN1"; a u32 byte length and a JSON header (key, counts, the id width,
// the tokenization's statistics and each example's source); zero padding to a multiple of 4; each example's length
// (u32); every id (u16 where the largest id fits, else u32); one bit a token, set where the token is trained (a
// label is its id or -100, nothing else).
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { IGNORE_INDEX, TOKENIZATION_VERSION, tokenizerSourceFiles, type TokenizationStats, type TokenizedExample } from '../data';
import { writeFileAtomicWith } from '../util/atomicFile';

/** The folder of a run that holds its tokenized data: `train.tokens`, and `eval.tokens` with an eval file. */
export const TOKEN_CACHE_DIR = 'tokenized';

export type TokenCacheRole = 'train' | 'eval';

/** What the tokenization of one data file gave: the examples kept and the statistics of all. */
export interface CachedTokenization {
  examples: TokenizedExample[];
  stats: TokenizationStats;
}

/** The settings besides the files that change what a data file tokenizes to. */
export interface TokenizationSettings {
  shape: string | null;
  skipInvalid: boolean;
  trainOnPrompt: boolean;
  maxLength: number;
}

const MAGIC = Buffer.from('QLTOKEN1', 'latin1');
/** Bytes of ids read or written at a time, so that a dataset of gigabytes never sits in one buffer. */
const CHUNK_BYTES = 16 << 20;

interface Header {
  key: string;
  count: number;
  tokens: number;
  idBytes: 2 | 4;
  stats: TokenizationStats;
  sources: string[];
}

export function tokenCacheFile(runDir: string, role: TokenCacheRole): string {
  return path.join(runDir, TOKEN_CACHE_DIR, `${role}.tokens`);
}

/** What a tokenization is keyed on, and the files it was read from as they were when hashed. */
export interface TokenCacheKey {
  /** Hex digest of the data file's bytes, the tokenizer's files, the settings and TOKENIZATION_VERSION. */
  digest: string;
  stamps: FileStamp[];
}

interface FileStamp {
  file: string;
  size: number;
  mtimeMs: number;
}

/**
 * The key of tokenizing `dataFile` with the model in `modelDir` under `settings`; null where a file cannot be read.
 * Taken before the files are read for tokenizing, and checked with unchangedSince after: a file saved in between is
 * neither read from the cache nor kept in it, since what was tokenized may not be what was hashed.
 */
export async function tokenCacheKey(dataFile: string, modelDir: string, settings: TokenizationSettings): Promise<TokenCacheKey | null> {
  try {
    return await keyOf(dataFile, modelDir, settings);
  } catch {
    return null; // a file missing or unreadable: reading it for tokenizing says what is wrong, and nothing is cached
  }
}

async function keyOf(dataFile: string, modelDir: string, settings: TokenizationSettings): Promise<TokenCacheKey> {
  const hash = createHash('sha256');
  hash.update(`${MAGIC.toString('latin1')}\0${TOKENIZATION_VERSION}\0${JSON.stringify([settings.shape, settings.skipInvalid, settings.trainOnPrompt, settings.maxLength])}\0`);
  const files = [dataFile, ...(await tokenizerSourceFiles(modelDir))];
  const stamps = files.map(stampOf);
  for (const [i, file] of files.entries()) {
    if (i > 0) hash.update(`\0${path.relative(modelDir, file)}\0`);
    await hashFile(hash, file);
  }
  return { digest: hash.digest('hex'), stamps };
}

/** Whether the files a key was taken from are as they were then (size and modification time). */
export function unchangedSince(key: TokenCacheKey): boolean {
  return key.stamps.every((s) => {
    try {
      const now = stampOf(s.file);
      return now.size === s.size && now.mtimeMs === s.mtimeMs;
    } catch {
      return false;
    }
  });
}

function stampOf(file: string): FileStamp {
  const st = fs.statSync(file);
  return { file, size: st.size, mtimeMs: st.mtimeMs };
}

async function hashFile(hash: ReturnType<typeof createHash>, file: string): Promise<void> {
  const handle = await fs.promises.open(file, 'r');
  try {
    const buffer = Buffer.alloc(CHUNK_BYTES);
    let size = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, null);
      if (bytesRead === 0) break;
      hash.update(buffer.subarray(0, bytesRead));
      size += bytesRead;
    }
    hash.update(`\0${size}`);
  } finally {
    await handle.close();
  }
}

/** Typed arrays are read and written in the machine's byte order; every platform the engine builds for is little-endian. */
const littleEndian = os.endianness() === 'LE';

/**
 * Writes the tokenization of one data file into the run's folder (atomically). False, writing nothing, where it cannot
 * be kept in this layout (a label other than its id or -100; a big-endian machine).
 */
export function writeTokenCache(runDir: string, role: TokenCacheRole, key: string, data: CachedTokenization): boolean {
  if (!littleEndian) return false;
  let tokens = 0;
  let maxId = 0;
  for (const e of data.examples) {
    if (e.labels.length !== e.ids.length) return false;
    for (let t = 0; t < e.ids.length; t++) {
      if (e.labels[t] !== IGNORE_INDEX && e.labels[t] !== e.ids[t]) return false;
      if (e.ids[t] < 0) return false;
      if (e.ids[t] > maxId) maxId = e.ids[t];
    }
    tokens += e.ids.length;
  }
  const idBytes: 2 | 4 = maxId <= 0xffff ? 2 : 4;
  const header: Header = { key, count: data.examples.length, tokens, idBytes, stats: data.stats, sources: data.examples.map((e) => e.source) };
  const headerBytes = Buffer.from(JSON.stringify(header), 'utf8');
  const file = tokenCacheFile(runDir, role);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  writeFileAtomicWith(file, (fd) => {
    const out = new ChunkedWriter(fd);
    const lengthPrefix = Buffer.alloc(4);
    lengthPrefix.writeUInt32LE(headerBytes.length);
    out.write(MAGIC);
    out.write(lengthPrefix);
    out.write(headerBytes);
    out.write(new Uint8Array(padding(MAGIC.length + 4 + headerBytes.length)));
    out.write(asBytes(Uint32Array.from(data.examples, (e) => e.ids.length)));
    for (const e of data.examples) out.write(asBytes(idBytes === 2 ? Uint16Array.from(e.ids) : Uint32Array.from(e.ids)));
    const mask = new TrainedMaskWriter(out);
    for (const e of data.examples) for (let t = 0; t < e.labels.length; t++) mask.push(e.labels[t] !== IGNORE_INDEX);
    mask.finish();
    out.flush();
  });
  return true;
}

/** The run's cached tokenization of one data file when it is there, whole, and of this key; otherwise null. */
export function readTokenCache(runDir: string, role: TokenCacheRole, key: string): CachedTokenization | null {
  if (!littleEndian) return null;
  let fd: number;
  try {
    fd = fs.openSync(tokenCacheFile(runDir, role), 'r');
  } catch {
    return null;
  }
  try {
    return readOpened(fd, key);
  } catch {
    return null; // damaged: tokenized afresh
  } finally {
    fs.closeSync(fd);
  }
}

function readOpened(fd: number, key: string): CachedTokenization | null {
  const size = fs.fstatSync(fd).size;
  const prefix = readAt(fd, 0, MAGIC.length + 4);
  if (!Buffer.from(prefix.buffer, prefix.byteOffset, MAGIC.length).equals(MAGIC)) return null;
  const headerLength = Buffer.from(prefix.buffer, prefix.byteOffset, prefix.length).readUInt32LE(MAGIC.length);
  if (MAGIC.length + 4 + headerLength > size) return null;
  const header = JSON.parse(Buffer.from(readAt(fd, MAGIC.length + 4, headerLength)).toString('utf8')) as Header;
  if (header.key !== key || !isWellFormed(header)) return null;
  const lengthsAt = MAGIC.length + 4 + headerLength + padding(MAGIC.length + 4 + headerLength);
  const idsAt = lengthsAt + 4 * header.count;
  const maskAt = idsAt + header.idBytes * header.tokens;
  if (size !== maskAt + Math.ceil(header.tokens / 8)) return null;
  const lengths = new Uint32Array(readAt(fd, lengthsAt, 4 * header.count).buffer);
  if (lengths.reduce((n, l) => n + l, 0) !== header.tokens) return null;
  const mask = readAt(fd, maskAt, Math.ceil(header.tokens / 8));
  const examples: TokenizedExample[] = [];
  const ids = new ChunkedIdReader(fd, idsAt, header.idBytes, header.tokens);
  let token = 0;
  for (let i = 0; i < header.count; i++) {
    const exampleIds = ids.take(token, lengths[i]);
    const labels = new Int32Array(exampleIds.length);
    for (let t = 0; t < exampleIds.length; t++, token++) labels[t] = (mask[token >> 3] >> (token & 7)) & 1 ? exampleIds[t] : IGNORE_INDEX;
    examples.push({ ids: exampleIds, labels, source: header.sources[i] });
  }
  return { examples, stats: header.stats };
}

function isWellFormed(h: Header): boolean {
  const count = (n: unknown) => Number.isSafeInteger(n) && (n as number) >= 0;
  return count(h.count) && count(h.tokens) && (h.idBytes === 2 || h.idBytes === 4) && Array.isArray(h.sources) &&
    h.sources.length === h.count && typeof h.stats === 'object' && h.stats !== null;
}

function padding(offset: number): number {
  return (4 - (offset % 4)) % 4;
}

function asBytes(a: Uint16Array | Uint32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function readAt(fd: number, position: number, length: number): Uint8Array {
  // a fresh ArrayBuffer of its own (offset 0), so that typed views of any width can be laid over it
  const bytes = new Uint8Array(new ArrayBuffer(length));
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, bytes, done, length - done, position + done);
    if (n === 0) throw new Error('unexpected end of file');
    done += n;
  }
  return bytes;
}

/** Writes through a buffer of CHUNK_BYTES, so that many small writes are few system calls. */
class ChunkedWriter {
  private readonly buffer = Buffer.alloc(CHUNK_BYTES);
  private used = 0;
  constructor(private readonly fd: number) {}

  write(bytes: Uint8Array): void {
    let at = 0;
    while (at < bytes.length) {
      const n = Math.min(bytes.length - at, this.buffer.length - this.used);
      this.buffer.set(bytes.subarray(at, at + n), this.used);
      this.used += n;
      at += n;
      if (this.used === this.buffer.length) this.flush();
    }
  }

  flush(): void {
    fs.writeSync(this.fd, this.buffer, 0, this.used);
    this.used = 0;
  }
}

/** Packs one bit a token, least significant bit first, into bytes. */
class TrainedMaskWriter {
  private readonly bytes = new Uint8Array(4096);
  private bits = 0;
  constructor(private readonly out: ChunkedWriter) {}

  push(trained: boolean): void {
    if (trained) this.bytes[this.bits >> 3] |= 1 << (this.bits & 7);
    if (++this.bits === this.bytes.length * 8) this.drain(this.bytes.length);
  }

  finish(): void {
    this.drain(Math.ceil(this.bits / 8));
  }

  private drain(byteCount: number): void {
    this.out.write(this.bytes.subarray(0, byteCount));
    this.bytes.fill(0);
    this.bits = 0;
  }
}

/** The ids section, read a window of about CHUNK_BYTES at a time as the examples ask for them in order. */
class ChunkedIdReader {
  private window: Uint16Array | Uint32Array = new Uint32Array(0);
  private windowStart = 0;
  constructor(
    private readonly fd: number,
    private readonly at: number,
    private readonly idBytes: 2 | 4,
    private readonly tokens: number,
  ) {}

  /** The ids of tokens [start, start + count) as an Int32Array of their own. */
  take(start: number, count: number): Int32Array {
    if (start + count > this.windowStart + this.window.length) {
      const want = Math.min(this.tokens - start, Math.max(count, CHUNK_BYTES / this.idBytes));
      const bytes = readAt(this.fd, this.at + start * this.idBytes, want * this.idBytes);
      this.window = this.idBytes === 2 ? new Uint16Array(bytes.buffer) : new Uint32Array(bytes.buffer);
      this.windowStart = start;
    }
    return Int32Array.from(this.window.subarray(start - this.windowStart, start - this.windowStart + count));
  }
}
