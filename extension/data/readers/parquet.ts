/**
 * Parquet, read with hyparquet (pure JS; snappy built in). Nested columns come back as JS arrays and objects, so
 * the Hugging Face layout of a chat dataset (`messages: list<struct<role, content>>`) needs no conversion; a
 * `messages`/`conversations` column stored as a JSON string is parsed, as in CSV. Rows keep their 1-based index.
 */
import * as path from 'node:path';
import { DataError, DataFileError } from '../errors';
import { readFileBytes } from '../textFile';
import { describeJsonError } from './jsonText';
import { RawRow } from './types';

const JSON_COLUMNS = ['messages', 'conversations'];

export async function readParquet(filePath: string): Promise<RawRow[]> {
  const bytes = await readFileBytes(filePath);
  // hyparquet reads from an ArrayBuffer (or any { byteLength, slice }); hand it exactly the file's bytes.
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
  // Loaded on first use: hyparquet is an ES module, and only Parquet files need it.
  const { parquetReadObjects } = await import('hyparquet');
  let objects: Record<string, unknown>[];
  try {
    objects = await parquetReadObjects({ file: buffer });
  } catch (err) {
    throw new DataFileError(filePath, `not a readable Parquet file (${(err as Error).message})`);
  }
  const file = path.basename(filePath);
  return objects.map((object, i): RawRow => {
    const at = { file, row: i + 1 };
    const value: Record<string, unknown> = { ...object };
    for (const column of JSON_COLUMNS) {
      const cell = value[column];
      if (typeof cell === 'string' && /^\s*[[{]/.test(cell)) {
        try {
          value[column] = JSON.parse(cell);
        } catch (err) {
          return { at, error: new DataError(at, `field "${column}" is not valid JSON (${describeJsonError(err, cell)})`, column) };
        }
      }
    }
    return { at, value };
  });
}
