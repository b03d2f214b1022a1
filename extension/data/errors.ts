/**
 * The dataset layer's error types. Row problems are collected as DataError values (never thrown one by one) so a
 * user sees every bad row of a file in one pass; whole-file problems are thrown as DataFileError.
 */
import * as path from 'node:path';

/** Where a row came from: a text line (JSONL, CSV) or a row index (JSON, Parquet), both 1-based. */
export interface SourceLocation {
  /** The file's base name, as shown in messages. */
  file: string;
  line?: number;
  row?: number;
}

/** "train.jsonl line 7" or "chat.json row 5". */
export function formatLocation(at: SourceLocation): string {
  if (at.line !== undefined) return `${at.file} line ${at.line}`;
  if (at.row !== undefined) return `${at.file} row ${at.row}`;
  return at.file;
}

/** One invalid row: `train.jsonl line 3: field "output" must be a string, got number`. */
export class DataError {
  readonly file: string;
  readonly line?: number;
  readonly row?: number;

  constructor(
    at: SourceLocation,
    /** What is wrong, without the location. */
    readonly message: string,
    /** The top-level field concerned, when there is one. */
    readonly field?: string,
  ) {
    this.file = at.file;
    if (at.line !== undefined) this.line = at.line;
    if (at.row !== undefined) this.row = at.row;
  }

  get location(): SourceLocation {
    return { file: this.file, line: this.line, row: this.row };
  }

  toString(): string {
    return `${formatLocation(this.location)}: ${this.message}`;
  }
}

/** Thrown when a dataset has invalid rows and the caller did not ask to skip them. */
export class DatasetInvalidError extends Error {
  constructor(readonly errors: readonly DataError[]) {
    const more = errors.length - 1;
    const hint =
      more > 0
        ? `(and ${more} more invalid row${more === 1 ? '' : 's'}; fix them or pass --skip-invalid)`
        : '(fix it or pass --skip-invalid)';
    super(`${String(errors[0])} ${hint}`);
    this.name = 'DatasetInvalidError';
  }
}

/** A problem with a whole file (missing, empty, binary, unreadable, unsupported): `train.jsonl: the file is empty`. */
export class DataFileError extends Error {
  /** The file's base name. */
  readonly file: string;

  constructor(
    /** The path as given. */
    readonly filePath: string,
    detail: string,
  ) {
    super(`${path.basename(filePath)}: ${detail}`);
    this.name = 'DataFileError';
    this.file = path.basename(filePath);
  }
}

/** "string", "number", "null", "array", "object", "boolean" — the JSON name of a value's type, for messages. */
export function jsonTypeName(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  if (typeof value === 'bigint') return 'number';
  if (value instanceof Uint8Array) return 'binary';
  if (value instanceof Date) return 'date';
  return typeof value;
}
