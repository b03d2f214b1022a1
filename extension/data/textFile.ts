/**
 * Reading a dataset file's bytes and text, with one clear error per way a file can be unusable: missing, a
 * directory, empty, binary (NUL bytes), or not UTF-8.
 */
import * as fs from 'node:fs/promises';
import { DataFileError } from './errors';

/** Reads the file's bytes; missing, unreadable and empty files are DataFileErrors naming the file. */
export async function readFileBytes(filePath: string): Promise<Buffer> {
  let bytes: Buffer;
  try {
    bytes = await fs.readFile(filePath);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new DataFileError(filePath, `file not found (${filePath})`);
    if (code === 'EISDIR') throw new DataFileError(filePath, `is a directory, not a data file (${filePath})`);
    throw new DataFileError(filePath, `cannot read the file (${(err as Error).message})`);
  }
  if (bytes.length === 0) throw new DataFileError(filePath, 'the file is empty');
  return bytes;
}

/**
 * Reads a UTF-8 text file (with or without BOM) and returns its text without the BOM. Binary content is refused
 * up front, as JSON or CSV parse errors on it would only confuse.
 */
export async function readTextFile(filePath: string): Promise<string> {
  const bytes = await readFileBytes(filePath);
  const nul = bytes.indexOf(0);
  if (nul >= 0) {
    throw new DataFileError(filePath, `not a text file (NUL byte at offset ${nul}, line ${lineAt(bytes, nul)}); expected UTF-8 text`);
  }
  const bad = firstInvalidUtf8(bytes);
  if (bad >= 0) {
    const byte = `0x${bytes[bad].toString(16).padStart(2, '0')}`;
    throw new DataFileError(filePath, `not valid UTF-8 text (invalid byte ${byte} at offset ${bad}, line ${lineAt(bytes, bad)}); save the file as UTF-8`);
  }
  let text = bytes.toString('utf8');
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  if (text.trim() === '') throw new DataFileError(filePath, 'the file is empty');
  return text;
}

/** 1-based line number of a byte offset. */
function lineAt(bytes: Uint8Array, offset: number): number {
  let line = 1;
  for (let i = 0; i < offset; i++) if (bytes[i] === 0x0a) line++;
  return line;
}

/**
 * Offset of the first byte that is not part of a well-formed UTF-8 sequence (RFC 3629: no overlongs, no
 * surrogates, nothing above U+10FFFF), or -1. Written out because TextDecoder's fatal mode does not say where.
 */
export function firstInvalidUtf8(bytes: Uint8Array): number {
  let i = 0;
  const n = bytes.length;
  while (i < n) {
    const b = bytes[i];
    if (b < 0x80) {
      i++;
      continue;
    }
    let need: number;
    let min2 = 0x80; // allowed range of the second byte, which rules out overlongs and surrogates
    let max2 = 0xbf;
    if (b >= 0xc2 && b <= 0xdf) need = 1;
    else if (b >= 0xe0 && b <= 0xef) {
      need = 2;
      if (b === 0xe0) min2 = 0xa0;
      if (b === 0xed) max2 = 0x9f;
    } else if (b >= 0xf0 && b <= 0xf4) {
      need = 3;
      if (b === 0xf0) min2 = 0x90;
      if (b === 0xf4) max2 = 0x8f;
    } else return i;
    if (i + need >= n) return i; // truncated sequence at the end of the file
    const b2 = bytes[i + 1];
    if (b2 < min2 || b2 > max2) return i;
    for (let k = 2; k <= need; k++) {
      const bk = bytes[i + k];
      if (bk < 0x80 || bk > 0xbf) return i;
    }
    i += need + 1;
  }
  return -1;
}
