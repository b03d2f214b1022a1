/** Reading a dataset file into normalized examples: read rows, detect (or take) the shape, validate every row. */
import { DataError, DataFileError, DatasetInvalidError } from './errors';
import { DataFormat, readDataFile } from './readers';
import { DatasetShape, detectShape, normalizeRow, NormalizedExample, unknownShapeMessage } from './shapes';

export interface ReadDatasetOptions {
  /** Use this shape instead of detecting it from the rows' fields. */
  shape?: DatasetShape;
}

export interface LoadDatasetOptions extends ReadDatasetOptions {
  /** Drop invalid rows (and report how many) instead of throwing DatasetInvalidError. */
  skipInvalid?: boolean;
}

export interface DatasetReadResult {
  /** The path as given. */
  file: string;
  format: DataFormat;
  /** Null only when no row could be read at all (every row is an error). */
  shape: DatasetShape | null;
  /** Rows in the file (blank JSONL/CSV lines excluded), valid or not. */
  rowCount: number;
  /** The valid rows, normalized, in file order. */
  examples: NormalizedExample[];
  /** One per invalid row, in file order. */
  errors: DataError[];
}

export interface LoadedDataset extends DatasetReadResult {
  shape: DatasetShape;
  /** Invalid rows dropped (errors.length; 0 unless skipInvalid). */
  skipped: number;
}

/**
 * Reads and validates every row, collecting row errors instead of throwing. Whole-file problems (missing, empty,
 * binary, unsupported type, no rows, no recognizable shape) throw DataFileError.
 */
export async function readDataset(file: string, options: ReadDatasetOptions = {}): Promise<DatasetReadResult> {
  const { format, rows } = await readDataFile(file);
  if (rows.length === 0) throw new DataFileError(file, 'has no rows');
  const objects = rows.flatMap((r) => ('value' in r ? [r.value] : []));
  const shape = options.shape ?? detectShape(objects);
  if (shape === null && objects.length > 0) throw new DataFileError(file, `${unknownShapeMessage(objects[0])} (or pass --shape)`);

  const examples: NormalizedExample[] = [];
  const errors: DataError[] = [];
  for (const row of rows) {
    if ('error' in row) {
      errors.push(row.error);
      continue;
    }
    const result = normalizeRow(shape as DatasetShape, row.value, row.at);
    if (result instanceof DataError) errors.push(result);
    else examples.push(result);
  }
  return { file, format, shape, rowCount: rows.length, examples, errors };
}

/**
 * Reads a dataset for training. Invalid rows throw one DatasetInvalidError listing them all, unless skipInvalid,
 * which drops them; a file left with no valid row throws either way.
 */
export async function loadDataset(file: string, options: LoadDatasetOptions = {}): Promise<LoadedDataset> {
  const result = await readDataset(file, options);
  if (result.errors.length > 0 && !options.skipInvalid) throw new DatasetInvalidError(result.errors);
  if (result.examples.length === 0) {
    throw new DataFileError(file, `has no valid rows (all ${result.rowCount} are invalid; the first: ${String(result.errors[0])})`);
  }
  return { ...result, shape: result.shape as DatasetShape, skipped: result.errors.length };
}
