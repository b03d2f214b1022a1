/** Reads any supported dataset file into raw rows, choosing the reader by the file's extension. */
import * as path from 'node:path';
import { DataFileError } from '../errors';
import { isFolder } from '../../util/isFolder';
import { readTextFile } from '../textFile';
import { parseCsv } from './csv';
import { parseJsonDocument } from './json';
import { parseJsonl } from './jsonl';
import { readParquet } from './parquet';
import { DataFormat, ReadResult } from './types';

export type { DataFormat, RawRow, ReadResult } from './types';

/** Extension → format; the keys are also the list shown when a file type is not supported. */
const FORMATS: Record<string, DataFormat> = {
  '.jsonl': 'jsonl',
  '.json': 'json',
  '.csv': 'csv',
  '.parquet': 'parquet',
};

export const SUPPORTED_EXTENSIONS = Object.keys(FORMATS);

/** The format of a data file, from its extension (case-insensitive); DataFileError for anything else. */
export function formatOf(filePath: string): DataFormat {
  const ext = path.extname(filePath).toLowerCase();
  const format = FORMATS[ext];
  if (format === undefined) {
    const what = ext === '' ? 'has no file extension' : `has an unsupported file type "${ext}"`;
    throw new DataFileError(filePath, `${what} (supported: ${SUPPORTED_EXTENSIONS.join(', ')})`);
  }
  return format;
}

/** Reads every row of a data file; whole-file problems throw DataFileError, row problems come back as rows. */
export async function readDataFile(filePath: string): Promise<ReadResult> {
  // a folder is said to be one, whatever its name (without an extension the message would be about that)
  if (isFolder(filePath)) throw new DataFileError(filePath, `is a directory, not a data file (${filePath})`);
  const format = formatOf(filePath);
  if (format === 'parquet') return { format, rows: await readParquet(filePath) };
  const text = await readTextFile(filePath);
  switch (format) {
    case 'jsonl':
      return { format, rows: parseJsonl(text, filePath) };
    case 'json':
      return { format, rows: parseJsonDocument(text, filePath) };
    case 'csv':
      return { format, rows: parseCsv(text, filePath) };
  }
}
