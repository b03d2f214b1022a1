/**
 * CSV (RFC 4180): a header row, comma-separated fields, quoted fields that may hold commas, doubled quotes and
 * line breaks. Rows keep the 1-based line number of their first line. Cells are strings, except that a
 * `messages` or `conversations` cell holding a JSON array or object is parsed, as chat datasets exported to CSV
 * store the conversation that way.
 */
import * as path from 'node:path';
import { DataError, DataFileError } from '../errors';
import { describeJsonError } from './jsonText';
import { RawRow } from './types';

/** Columns whose cells may hold JSON. */
const JSON_COLUMNS = new Set(['messages', 'conversations']);

interface CsvRecord {
  line: number;
  fields: string[];
  /** A syntax problem in this record; its fields are then unreliable. */
  error?: string;
  /** A field was quoted: `""` alone on a line is an empty cell, not a blank line. */
  quoted?: boolean;
}

/** Parses CSV text (BOM already removed) into rows keyed by the header. */
export function parseCsv(text: string, filePath: string): RawRow[] {
  const file = path.basename(filePath);
  const records = splitRecords(text).filter((r) => !(r.fields.length === 1 && r.fields[0] === '' && !r.error && !r.quoted));
  if (records.length === 0) throw new DataFileError(filePath, 'the file is empty');
  const header = records[0];
  if (header.error) throw new DataFileError(filePath, `the header row (line ${header.line}) ${header.error}`);
  const columns = header.fields.map((name) => name.trim());
  const duplicate = columns.find((name, i) => columns.indexOf(name) !== i);
  if (duplicate !== undefined) throw new DataFileError(filePath, `the header row has column "${duplicate}" twice`);

  return records.slice(1).map((record): RawRow => {
    const at = { file, line: record.line };
    if (record.error) return { at, error: new DataError(at, record.error) };
    if (record.fields.length !== columns.length) {
      return {
        at,
        error: new DataError(
          at,
          `has ${record.fields.length} field${record.fields.length === 1 ? '' : 's'} but the header has ${columns.length} (quote fields that contain commas)`,
        ),
      };
    }
    const value: Record<string, unknown> = {};
    for (let c = 0; c < columns.length; c++) {
      const cell = record.fields[c];
      if (JSON_COLUMNS.has(columns[c]) && /^\s*[[{]/.test(cell)) {
        try {
          value[columns[c]] = JSON.parse(cell);
        } catch (err) {
          return { at, error: new DataError(at, `field "${columns[c]}" is not valid JSON (${describeJsonError(err, cell)})`, columns[c]) };
        }
      } else {
        value[columns[c]] = cell;
      }
    }
    return { at, value };
  });
}

/** The record-splitting state machine: tracks quotes so commas and line breaks inside them stay in the field. */
function splitRecords(text: string): CsvRecord[] {
  const records: CsvRecord[] = [];
  let line = 1;
  let record: CsvRecord = { line, fields: [] };
  let field = '';
  let i = 0;
  const n = text.length;
  const endRecord = () => {
    record.fields.push(field);
    records.push(record);
    field = '';
    record = { line, fields: [] };
  };
  while (i < n) {
    const ch = text[i];
    if (ch === '"' && field === '') {
      // Quoted field: runs to the next lone quote.
      record.quoted = true;
      const openLine = line;
      i++;
      let closed = false;
      while (i < n) {
        const q = text[i];
        if (q === '"') {
          if (text[i + 1] === '"') {
            field += '"';
            i += 2;
            continue;
          }
          closed = true;
          i++;
          break;
        }
        if (q === '\n' || (q === '\r' && text[i + 1] !== '\n')) line++;
        field += q;
        i++;
      }
      if (!closed) {
        record.error = `has a quoted field opened on line ${openLine} that is never closed`;
        endRecord();
        return records;
      }
      // After the closing quote only a separator or the end of the record may follow.
      if (i < n && text[i] !== ',' && text[i] !== '\n' && text[i] !== '\r') {
        record.error ??= `has text after a closing quote (write a quote inside a quoted field as "")`;
        while (i < n && text[i] !== ',' && text[i] !== '\n' && text[i] !== '\r') field += text[i++];
      }
      continue;
    }
    if (ch === ',') {
      record.fields.push(field);
      field = '';
      i++;
    } else if (ch === '\n' || ch === '\r') {
      // LF, CRLF, and the lone CR of old Mac spreadsheets ("CSV (Macintosh)" in Excel)
      i += ch === '\r' && text[i + 1] === '\n' ? 2 : 1;
      line++;
      endRecord();
    } else {
      field += ch;
      i++;
    }
  }
  // A final record without a trailing line break.
  if (field !== '' || record.fields.length > 0) endRecord();
  return records;
}
