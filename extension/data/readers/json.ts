/**
 * JSON documents: an array of objects, or an object with exactly one array-of-objects field (`{"data": [...]}`,
 * as many exports wrap rows), or a table as pandas' to_json writes it (by columns or by index). Rows keep their
 * 1-based index in that array (in the table's order).
 */
import * as path from 'node:path';
import { DataError, DataFileError, jsonTypeName } from '../errors';
import { SHAPE_SIGNATURE_FIELDS } from '../shapes';
import { describeJsonError } from './jsonText';
import { isRecord, RawRow } from './types';

const EXPECTED = 'expected an array of objects, or an object with one array field such as {"data": [...]}';

/** Parses JSON text (BOM already removed). Whole-document problems throw DataFileError. */
export function parseJsonDocument(text: string, filePath: string): RawRow[] {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    if (looksLikeJsonLines(text)) {
      throw new DataFileError(filePath, 'holds JSON Lines (one object per line), not one JSON document; rename it to .jsonl');
    }
    throw new DataFileError(filePath, `not valid JSON (${describeJsonError(err, text)})`);
  }
  return rowsOf(arrayOfRows(doc, filePath), path.basename(filePath));
}

function arrayOfRows(doc: unknown, filePath: string): unknown[] {
  if (Array.isArray(doc)) return doc;
  if (!isRecord(doc)) throw new DataFileError(filePath, `${EXPECTED}; got ${jsonTypeName(doc)}`);
  const keys = Object.keys(doc);
  const table = pandasTableRows(doc, keys);
  if (table !== null) return table;
  if (keys.some((k) => SHAPE_SIGNATURE_FIELDS.includes(k))) {
    throw new DataFileError(
      filePath,
      'holds a single example object; put the examples in an array [ {...}, {...} ] or use one object per line in a .jsonl file',
    );
  }
  const arrays = keys.filter((k) => Array.isArray(doc[k]) && (doc[k] as unknown[]).some(isRecord));
  if (arrays.length === 1) return doc[arrays[0]] as unknown[];
  if (arrays.length === 0) {
    // one array field that holds no objects: its rows are what the file has (none, or each one invalid)
    const anyArrays = keys.filter((k) => Array.isArray(doc[k]));
    if (anyArrays.length === 1) {
      const items = doc[anyArrays[0]] as unknown[];
      if (items.length === 0) throw new DataFileError(filePath, `has no rows ("${anyArrays[0]}" is an empty array)`);
      return items;
    }
    const fields = keys.length > 0 ? `fields ${keys.map((k) => `"${k}"`).join(', ')}` : 'no fields';
    throw new DataFileError(filePath, `${EXPECTED}; got an object with ${fields}`);
  }
  const names = arrays.map((k) => `"${k}"`).join(', ');
  throw new DataFileError(filePath, `has several arrays of objects (${names}); keep only the one with the examples`);
}

/**
 * The rows of a table as pandas' DataFrame.to_json writes it by default (orient='columns': {"instruction": {"0": ...,
 * "1": ...}, "output": {...}}) or with orient='index' ({"0": {"instruction": ..., "output": ...}, ...}): every value
 * an object, and the column names a dataset shape's. Rows come in the order of their labels (JSON.parse puts labels
 * that are numbers in ascending order, whatever the file's). Null for anything else.
 */
function pandasTableRows(doc: Record<string, unknown>, keys: string[]): unknown[] | null {
  const inner = keys.map((k) => doc[k]) as Record<string, unknown>[];
  if (keys.length === 0 || !inner.every(isRecord)) return null;
  if (keys.some((k) => SHAPE_SIGNATURE_FIELDS.includes(k))) {
    // by columns: every column holds the same row labels
    const labels = Object.keys(inner[0]);
    const same = inner.every((column) => Object.keys(column).length === labels.length && labels.every((label) => label in column));
    return same ? labels.map((label) => Object.fromEntries(keys.map((k, c) => [k, inner[c][label]]))) : null;
  }
  // by index: each value a row, checked as rows are (fields may differ between them)
  return inner.some((row) => Object.keys(row).some((k) => SHAPE_SIGNATURE_FIELDS.includes(k))) ? inner : null;
}

function rowsOf(items: unknown[], file: string): RawRow[] {
  return items.map((value, i): RawRow => {
    const at = { file, row: i + 1 };
    return isRecord(value) ? { at, value } : { at, error: new DataError(at, `expected a JSON object, got ${jsonTypeName(value)}`) };
  });
}

/** Two or more non-blank lines, the first of which is a JSON object on its own. */
function looksLikeJsonLines(text: string): boolean {
  const lines = text.split('\n').filter((l) => l.trim() !== '');
  if (lines.length < 2) return false;
  try {
    return isRecord(JSON.parse(lines[0]));
  } catch {
    return false;
  }
}
