/**
 * Dataset shapes: which fields a row has, and how each shape becomes one of three normalized kinds of example
 * (chat, completion, text). Every check that fails becomes a DataError naming the row and the field.
 */
import { DataError, jsonTypeName, SourceLocation } from './errors';

export type DatasetShape = 'messages' | 'sharegpt' | 'alpaca' | 'completion' | 'text';

export type ChatRole = 'system' | 'user' | 'assistant';

export interface ChatMessage {
  role: ChatRole;
  content: string;
}

/** A normalized example, whatever shape the file had. */
export type ExampleBody =
  /** tools: the row's tool definitions (JSON schemas), given to the chat template as `tools`, as TRL does. */
  | { kind: 'chat'; messages: ChatMessage[]; tools?: Record<string, unknown>[] }
  | { kind: 'completion'; prompt: string; completion: string }
  | { kind: 'text'; text: string };

/** A normalized example with the row it came from. */
export type NormalizedExample = ExampleBody & { at: SourceLocation };

/** Shapes in detection priority: a row with both `messages` and `text` is a messages row. */
export const DATASET_SHAPES: readonly DatasetShape[] = ['messages', 'sharegpt', 'alpaca', 'completion', 'text'];

/** The fields that identify each shape (all must be present). */
const SIGNATURES: Record<DatasetShape, readonly string[]> = {
  messages: ['messages'],
  sharegpt: ['conversations'],
  alpaca: ['instruction', 'output'],
  completion: ['prompt', 'completion'],
  text: ['text'],
};

/** Fields that mark an object as an example rather than a wrapper (used by the JSON reader). */
export const SHAPE_SIGNATURE_FIELDS: readonly string[] = [...new Set(Object.values(SIGNATURES).flat())];

const SHAPE_LABELS: Record<DatasetShape, string> = {
  messages: 'messages [{role, content}]',
  sharegpt: 'ShareGPT conversations [{from, value}]',
  alpaca: 'alpaca instruction/input/output',
  completion: 'prompt/completion',
  text: 'text',
};

export const CHAT_ROLES: readonly ChatRole[] = ['system', 'user', 'assistant'];

/** ShareGPT speaker names and the role each one means. */
const SHAREGPT_ROLES: Record<string, ChatRole> = {
  system: 'system',
  human: 'user',
  user: 'user',
  gpt: 'assistant',
  assistant: 'assistant',
  model: 'assistant',
};

/** The shape whose signature fields the row has (all of them), in priority order, or null. */
export function shapeOfRow(row: Record<string, unknown>): DatasetShape | null {
  return DATASET_SHAPES.find((shape) => SIGNATURES[shape].every((field) => field in row)) ?? null;
}

/** Rows looked at to detect a file's shape. */
const DETECTION_ROWS = 100;

/**
 * The shape of a file: the most common full match among its first readable rows (ties go to the earlier shape in
 * priority order), else the most common partial match on the first signature field (so a file of alpaca rows that
 * all lack `output` is still reported as alpaca rows missing a field). Null when no row looks like any shape.
 */
export function detectShape(rows: readonly Record<string, unknown>[]): DatasetShape | null {
  const sample = rows.slice(0, DETECTION_ROWS);
  const vote = (shapeOf: (row: Record<string, unknown>) => DatasetShape | null): DatasetShape | null => {
    const counts = new Map<DatasetShape, number>();
    for (const row of sample) {
      const shape = shapeOf(row);
      if (shape) counts.set(shape, (counts.get(shape) ?? 0) + 1);
    }
    let best: DatasetShape | null = null;
    for (const shape of DATASET_SHAPES) {
      if ((counts.get(shape) ?? 0) > (best ? (counts.get(best) ?? 0) : 0)) best = shape;
    }
    return best;
  };
  return vote(shapeOfRow) ?? vote((row) => DATASET_SHAPES.find((shape) => SIGNATURES[shape][0] in row) ?? null);
}

/** Message for a file whose shape cannot be told, listing the fields it has. */
export function unknownShapeMessage(row: Record<string, unknown> | undefined): string {
  const fields = row ? Object.keys(row) : [];
  const has = fields.length > 0 ? `its rows have fields ${fields.map((f) => `"${f}"`).join(', ')}` : 'its rows have no fields';
  return `cannot tell the dataset's shape: ${has}; expected one of ${DATASET_SHAPES.map((s) => SHAPE_LABELS[s]).join('; ')}`;
}

/** A failed check, carried up to the row level. */
class RowProblem {
  constructor(
    readonly message: string,
    readonly field?: string,
  ) {}
}

/** Half a UTF-16 surrogate pair: JSON can escape one ("\ud800"), but it is no character, and no tokenizer takes it. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function checkWellFormed(value: string, what: string, field: string): string {
  const lone = LONE_SURROGATE.exec(value);
  if (lone !== null) {
    const code = lone[0].charCodeAt(0).toString(16);
    throw new RowProblem(`${what} holds half a UTF-16 surrogate pair (\\u${code} at character ${lone.index + 1}), which is not text`, field);
  }
  return value;
}

function requireString(row: Record<string, unknown>, field: string, allowEmpty: boolean): string {
  if (!(field in row) || row[field] === undefined) throw new RowProblem(`field "${field}" is missing`, field);
  const value = row[field];
  if (typeof value !== 'string') throw new RowProblem(`field "${field}" must be a string, got ${jsonTypeName(value)}`, field);
  if (!allowEmpty && value.trim() === '') throw new RowProblem(`field "${field}" is empty`, field);
  return checkWellFormed(value, `field "${field}"`, field);
}

/** Reads a list of chat turns, with field names and role mapping given per shape. */
function readTurns(
  row: Record<string, unknown>,
  listField: string,
  roleField: string,
  contentField: string,
  roleOf: (name: string) => ChatRole | undefined,
  allowedRoles: string,
): ChatMessage[] {
  if (!(listField in row) || row[listField] === undefined) throw new RowProblem(`field "${listField}" is missing`, listField);
  const list = row[listField];
  if (!Array.isArray(list)) throw new RowProblem(`field "${listField}" must be an array, got ${jsonTypeName(list)}`, listField);
  if (list.length === 0) throw new RowProblem(`field "${listField}" is empty`, listField);
  const messages = list.map((item: unknown, i): ChatMessage => {
    const n = i + 1;
    if (typeof item !== 'object' || item === null || Array.isArray(item)) {
      throw new RowProblem(`message ${n} must be an object, got ${jsonTypeName(item)}`, listField);
    }
    const turn = item as Record<string, unknown>;
    const name = turn[roleField];
    if (name === undefined) throw new RowProblem(`message ${n}: field "${roleField}" is missing`, listField);
    if (typeof name !== 'string') {
      throw new RowProblem(`message ${n}: field "${roleField}" must be a string, got ${jsonTypeName(name)}`, listField);
    }
    const role = roleOf(name.toLowerCase());
    if (role === undefined) throw new RowProblem(`message ${n} has ${roleField} "${name}" (allowed: ${allowedRoles})`, listField);
    const content = turn[contentField];
    if (content === undefined) throw new RowProblem(`message ${n}: field "${contentField}" is missing`, listField);
    if (typeof content !== 'string') {
      throw new RowProblem(`message ${n}: field "${contentField}" must be a string, got ${jsonTypeName(content)}`, listField);
    }
    if (role === 'assistant' && content.trim() === '') throw new RowProblem(`message ${n} (assistant) is empty`, listField);
    return { role, content: checkWellFormed(content, `message ${n}`, listField) };
  });
  if (!messages.some((m) => m.role === 'assistant')) throw new RowProblem('conversation has no assistant message', listField);
  return messages;
}

/**
 * A chat row's `tools`: an array of tool definitions (objects), or a JSON string of one (as datasets on the Hub
 * often store them, and TRL decodes them); absent, null or [] when the row has none.
 */
function readTools(row: Record<string, unknown>): Record<string, unknown>[] | undefined {
  let tools = row.tools;
  if (tools === undefined || tools === null) return undefined;
  if (typeof tools === 'string') {
    if (tools.trim() === '') return undefined;
    try {
      tools = JSON.parse(tools);
    } catch {
      throw new RowProblem('field "tools" is a string but not JSON (expected an array of tool definitions)', 'tools');
    }
    if (tools === null) return undefined;  // "null", as a table column of JSON strings writes a row without tools
  }
  if (!Array.isArray(tools)) throw new RowProblem(`field "tools" must be an array of tool definitions, got ${jsonTypeName(tools)}`, 'tools');
  const notObject = tools.findIndex((t) => typeof t !== 'object' || t === null || Array.isArray(t));
  if (notObject >= 0) throw new RowProblem(`tool ${notObject + 1} in field "tools" must be an object, got ${jsonTypeName(tools[notObject])}`, 'tools');
  return tools.length > 0 ? (tools as Record<string, unknown>[]) : undefined;
}

function chatBody(messages: ChatMessage[], row: Record<string, unknown>): ExampleBody {
  const tools = readTools(row);
  return tools === undefined ? { kind: 'chat', messages } : { kind: 'chat', messages, tools };
}

function normalizeAs(shape: DatasetShape, row: Record<string, unknown>): ExampleBody {
  switch (shape) {
    case 'messages':
      return chatBody(readTurns(row, 'messages', 'role', 'content', (r) => CHAT_ROLES.find((c) => c === r), CHAT_ROLES.join(', ')), row);
    case 'sharegpt':
      return chatBody(readTurns(row, 'conversations', 'from', 'value', (r) => SHAREGPT_ROLES[r], Object.keys(SHAREGPT_ROLES).join(', ')), row);
    case 'alpaca': {
      const instruction = requireString(row, 'instruction', false);
      const input = row.input === undefined || row.input === null ? '' : requireString(row, 'input', true);
      const output = requireString(row, 'output', false);
      const user = input.trim() === '' ? instruction : `${instruction}\n\n${input}`;
      return { kind: 'chat', messages: [{ role: 'user', content: user }, { role: 'assistant', content: output }] };
    }
    case 'completion':
      return { kind: 'completion', prompt: requireString(row, 'prompt', true), completion: requireString(row, 'completion', false) };
    case 'text':
      return { kind: 'text', text: requireString(row, 'text', false) };
  }
}

/**
 * Normalizes one row read as `shape`. A row that fails because it has another shape's fields says so, since a
 * file holds one shape.
 */
export function normalizeRow(shape: DatasetShape, row: Record<string, unknown>, at: SourceLocation): NormalizedExample | DataError {
  try {
    return { ...normalizeAs(shape, row), at };
  } catch (err) {
    if (!(err instanceof RowProblem)) throw err;
    const own = shapeOfRow(row);
    const note =
      own !== null && own !== shape ? ` (this row has ${SHAPE_LABELS[own]} fields, but the file's shape is ${SHAPE_LABELS[shape]})` : '';
    return new DataError(at, err.message + note, err.field);
  }
}

export function isDatasetShape(value: string): value is DatasetShape {
  return (DATASET_SHAPES as readonly string[]).includes(value);
}
