/** JSON Lines: one JSON object per line; blank lines are skipped, rows keep their 1-based line number. */
import * as path from 'node:path';
import { DataError, DataFileError, jsonTypeName } from '../errors';
import { describeJsonError } from './jsonText';
import { isRecord, RawRow } from './types';

/**
 * Parses JSONL text (BOM already removed); LF and CRLF line ends both work, and lone CRs (classic Mac OS) in a file
 * with no LF at all. Elsewhere a CR is left to JSON, which takes it as whitespace between tokens.
 */
export function parseJsonl(text: string, filePath: string): RawRow[] {
  const file = path.basename(filePath);
  const rows: RawRow[] = [];
  const lines = text.split(text.includes('\n') ? '\n' : '\r');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].endsWith('\r') ? lines[i].slice(0, -1) : lines[i];
    if (line.trim() === '') continue;
    const at = { file, line: i + 1 };
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (err) {
      if (rows.length === 0) refuseJsonDocument(text, filePath);
      rows.push({ at, error: new DataError(at, `not valid JSON (${describeJsonError(err, line)})`) });
      continue;
    }
    if (isRecord(value)) rows.push({ at, value });
    else rows.push({ at, error: new DataError(at, `expected a JSON object, got ${jsonTypeName(value)}`) });
  }
  return rows;
}

/** A pretty-printed JSON document saved as .jsonl fails on its first line: said once, instead of an error per line. */
function refuseJsonDocument(text: string, filePath: string): void {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return;
  }
  const what = Array.isArray(value) ? `a JSON array of ${value.length} item${value.length === 1 ? '' : 's'}` : 'one JSON document';
  throw new DataFileError(filePath, `is ${what}, not JSON Lines (one object per line): name it .json, or write one row per line`);
}
