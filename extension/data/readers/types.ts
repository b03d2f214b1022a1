import { DataError, SourceLocation } from '../errors';

export type DataFormat = 'jsonl' | 'json' | 'csv' | 'parquet';

/** One row as read from the file: an object, or the reason it could not be read as one. */
export type RawRow =
  | { at: SourceLocation; value: Record<string, unknown> }
  | { at: SourceLocation; error: DataError };

export interface ReadResult {
  format: DataFormat;
  rows: RawRow[];
}

/** A row value that is a plain object (not an array, not null). */
export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
