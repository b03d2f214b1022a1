// Dataset readers: every format holds every shape and reads to the same normalized examples; encodings, line
// ends and blank lines; the source position of each row; one clear error per unusable file.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { DATASET_SHAPES, DataFileError, DatasetShape, formatLocation, readDataset } from '../../extension/data';
import { bodies, dataFixtures, shapeRows, toCsv, writeTemp } from '../fixtures/data/helpers';

const rows = shapeRows();

/** The same rows written in each text format. */
function writeAll(shape: DatasetShape): Record<'jsonl' | 'json' | 'csv' | 'parquet', string> {
  const r = rows[shape];
  return {
    jsonl: writeTemp(`${shape}.jsonl`, r.map((row) => JSON.stringify(row)).join('\n') + '\n'),
    json: writeTemp(`${shape}.json`, JSON.stringify(r, null, 2)),
    csv: writeTemp(`${shape}.csv`, toCsv(r)),
    parquet: path.join(dataFixtures, `${shape}.parquet`),
  };
}

for (const shape of DATASET_SHAPES) {
  test(`${shape}: JSONL, JSON, CSV and Parquet read to the same normalized examples`, async () => {
    const files = writeAll(shape);
    const reference = await readDataset(files.jsonl);
    assert.equal(reference.shape, shape);
    assert.deepEqual(reference.errors, []);
    assert.equal(reference.examples.length, rows[shape].length);
    for (const [format, file] of Object.entries(files)) {
      const read = await readDataset(file);
      assert.equal(read.format, format);
      assert.equal(read.shape, shape, `${format} shape`);
      assert.deepEqual(read.errors.map(String), [], `${format} errors`);
      assert.equal(read.rowCount, rows[shape].length);
      assert.deepEqual(bodies(read.examples), bodies(reference.examples), `${format} examples`);
    }
  });
}

test('normalized forms: messages/sharegpt/alpaca become chat, prompt/completion and text keep their kind', async () => {
  const alpaca = await readDataset(writeAll('alpaca').jsonl);
  assert.deepEqual(bodies(alpaca.examples), [
    { kind: 'chat', messages: [{ role: 'user', content: 'Name the capital of France.' }, { role: 'assistant', content: 'The capital of France is Paris.' }] },
    { kind: 'chat', messages: [{ role: 'user', content: 'Add the two numbers.\n\n2, 2' }, { role: 'assistant', content: '2 plus 2 is 4.' }] },
  ]);
  const sharegpt = await readDataset(writeAll('sharegpt').json);
  const messages = await readDataset(writeAll('messages').json);
  assert.deepEqual(bodies(sharegpt.examples), bodies(messages.examples));
  assert.deepEqual(sharegpt.examples[0].kind === 'chat' && sharegpt.examples[0].messages.map((m) => m.role), ['system', 'user', 'assistant']);
  const completion = await readDataset(writeAll('completion').csv);
  assert.deepEqual(bodies(completion.examples)[1], { kind: 'completion', prompt: '2 plus 2 is', completion: ' 4, "of course".' });
  const text = await readDataset(writeAll('text').csv);
  assert.deepEqual(bodies(text.examples)[1], { kind: 'text', text: 'Line one, with a comma.\nLine "two".' });
});

test('rows keep their source: JSONL/CSV line of the first line, JSON/Parquet row index', async () => {
  const jsonl = writeTemp('train.jsonl', '\n' + JSON.stringify({ text: 'a' }) + '\n\n  \n' + JSON.stringify({ text: 'b' }) + '\n');
  assert.deepEqual((await readDataset(jsonl)).examples.map((e) => formatLocation(e.at)), ['train.jsonl line 2', 'train.jsonl line 5']);

  // The second record spans lines 3-4 (a quoted line break); the third starts on line 5.
  const csv = writeTemp('notes.csv', 'text\nfirst\n"two\nlines"\nthird\n');
  const read = await readDataset(csv);
  assert.deepEqual(read.examples.map((e) => formatLocation(e.at)), ['notes.csv line 2', 'notes.csv line 3', 'notes.csv line 5']);
  assert.deepEqual(bodies(read.examples), [{ kind: 'text', text: 'first' }, { kind: 'text', text: 'two\nlines' }, { kind: 'text', text: 'third' }]);

  const json = writeTemp('chat.json', JSON.stringify(rows.text));
  assert.deepEqual((await readDataset(json)).examples.map((e) => formatLocation(e.at)), ['chat.json row 1', 'chat.json row 2']);
  const parquet = await readDataset(path.join(dataFixtures, 'text.parquet'));
  assert.deepEqual(parquet.examples.map((e) => formatLocation(e.at)), ['text.parquet row 1', 'text.parquet row 2']);
});

test('UTF-8 BOM and CRLF line ends read like plain LF files, in JSONL, JSON and CSV', async () => {
  const bom = '\ufeff';
  for (const shape of ['messages', 'alpaca', 'text'] as const) {
    const files = writeAll(shape);
    const expected = bodies((await readDataset(files.jsonl)).examples);
    const crlfJsonl = writeTemp(`${shape}.jsonl`, bom + rows[shape].map((r) => JSON.stringify(r)).join('\r\n') + '\r\n\r\n');
    const crlfJson = writeTemp(`${shape}.json`, bom + JSON.stringify(rows[shape], null, 2).replace(/\n/g, '\r\n'));
    const crlfCsv = writeTemp(`${shape}.csv`, bom + toCsv(rows[shape], '\r\n'));
    // lone CR: "CSV (Macintosh)" as older Excel writes it
    const crCsv = writeTemp(`${shape}-cr.csv`, toCsv(rows[shape], '\r'));
    const crJsonl = writeTemp(`${shape}-cr.jsonl`, rows[shape].map((r) => JSON.stringify(r)).join('\r') + '\r');
    for (const file of [crlfJsonl, crlfJson, crlfCsv, crCsv, crJsonl]) {
      const read = await readDataset(file);
      assert.deepEqual(read.errors.map(String), [], file);
      assert.deepEqual(bodies(read.examples), expected, file);
    }
  }
  // A quoted CSV field keeps its own line break as written (CRLF stays CRLF inside quotes, per RFC 4180).
  const csv = await readDataset(writeTemp('t.csv', 'text\r\n"a\r\nb"\r\n'));
  assert.deepEqual(bodies(csv.examples), [{ kind: 'text', text: 'a\r\nb' }]);
  // "" alone on a line is an empty cell (reported as such), not a blank line (skipped)
  const empty = await readDataset(writeTemp('empty-cell.csv', 'text\n"a"\n""\n\n"b"\n'));
  assert.deepEqual(bodies(empty.examples), [{ kind: 'text', text: 'a' }, { kind: 'text', text: 'b' }]);
  assert.deepEqual(empty.errors.map(String), ['empty-cell.csv line 3: field "text" is empty']);
  // with lone CRs, records still split and an invalid row's line number counts them
  const cr = await readDataset(writeTemp('cr.csv', 'text\r"a"\r"b"x\r'));
  assert.deepEqual(bodies(cr.examples), [{ kind: 'text', text: 'a' }]);
  assert.match(String(cr.errors[0]), /cr\.csv line 3: /);
  // JSONL: lone CRs end lines only in a file without LFs; elsewhere a CR is JSON whitespace inside its line
  const crl = await readDataset(writeTemp('cr.jsonl', '{"text": "a"}\r{"text": 1}\r'));
  assert.deepEqual(bodies(crl.examples), [{ kind: 'text', text: 'a' }]);
  assert.deepEqual(crl.errors.map(String), ['cr.jsonl line 2: field "text" must be a string, got number']);
  const inside = await readDataset(writeTemp('cr-inside.jsonl', '{"text":\r"a"}\n{"text": "b"}\n'));
  assert.deepEqual(bodies(inside.examples), [{ kind: 'text', text: 'a' }, { kind: 'text', text: 'b' }]);
});

test('JSON: an array, or an object with exactly one array of rows; other layouts are clear errors', async () => {
  const wrapped = writeTemp('wrapped.json', JSON.stringify({ version: 2, data: rows.alpaca }));
  assert.equal((await readDataset(wrapped)).examples.length, 2);
  // pandas' DataFrame.to_json: by columns (its default) and by index
  const byRecords = bodies((await readDataset(wrapped)).examples);
  const columns = Object.fromEntries(Object.keys(rows.alpaca[0]).map((k) => [k, Object.fromEntries(rows.alpaca.map((r, i) => [String(i), r[k] ?? null]))]));
  assert.deepEqual(bodies((await readDataset(writeTemp('columns.json', JSON.stringify(columns)))).examples), byRecords);
  const byIndex = Object.fromEntries(rows.alpaca.map((r, i) => [String(i), r]));
  assert.deepEqual(bodies((await readDataset(writeTemp('index.json', JSON.stringify(byIndex)))).examples), byRecords);
  const badColumn = await readDataset(writeTemp('bad-column.json', JSON.stringify({ text: { 0: 'a', 1: 2 } })));
  assert.deepEqual(badColumn.errors.map(String), ['bad-column.json row 2: field "text" must be a string, got number']);
  // by index, rows whose fields differ in order or in which optional ones they have; labels in numeric order
  const mixed = { 10: { output: 'c', instruction: 'C' }, 2: { instruction: 'B', output: 'b', input: null }, 1: { instruction: 'A', output: 'a' } };
  const read = await readDataset(writeTemp('mixed-index.json', JSON.stringify(mixed)));
  assert.deepEqual(read.examples.map((e) => (e.kind === 'chat' ? e.messages[0].content : '')), ['A', 'B', 'C']);
  await assert.rejects(readDataset(writeTemp('empty-table.json', JSON.stringify({ instruction: {}, output: {} }))), /^Error: empty-table\.json: has no rows$|empty-table\.json: has no rows/);
  // one array field of no objects: its rows, each one invalid where it is not an object (as in a top-level array)
  const strings = await readDataset(writeTemp('strings.json', JSON.stringify({ data: ['a', 'b'] })));
  assert.deepEqual(strings.errors.map(String), ['strings.json row 1: expected a JSON object, got string', 'strings.json row 2: expected a JSON object, got string']);

  const cases: [string, string, RegExp][] = [
    ['lines.json', rows.text.map((r) => JSON.stringify(r)).join('\n'), /^lines\.json: holds JSON Lines \(one object per line\), not one JSON document; rename it to \.jsonl$/],
    ['two.json', JSON.stringify({ train: rows.text, test: rows.text }), /^two\.json: has several arrays of objects \("train", "test"\); keep only the one with the examples$/],
    ['none.json', JSON.stringify({ name: 'x', count: 3 }), /^none\.json: expected an array of objects, or an object with one array field such as \{"data": \[\.\.\.\]\}; got an object with fields "name", "count"$/],
    ['scalar.json', '42', /^scalar\.json: expected an array of objects, .*; got number$/],
    ['single.json', JSON.stringify(rows.messages[0]), /^single\.json: holds a single example object; put the examples in an array/],
    ['broken.json', '[\n  {"text": "a"},\n  {"text": }\n]', /^broken\.json: not valid JSON \(unexpected token '}' at line 3 column 12\)$/],
  ];
  for (const [name, content, expected] of cases) {
    await assert.rejects(readDataset(writeTemp(name, content)), (err: Error) => {
      assert.ok(err instanceof DataFileError, `${name}: ${err}`);
      assert.match(err.message, expected);
      return true;
    });
  }
});

test('CSV: quoted commas, doubled quotes and line breaks; JSON in messages cells; short rows and bad quotes', async () => {
  const csv = [
    'instruction,input,output',
    '"Say ""hi"", politely",,"Hi, there!"',
    'Count,"1,2,3","Three\nnumbers"',
  ].join('\n');
  const read = await readDataset(writeTemp('a.csv', csv));
  assert.deepEqual(read.errors.map(String), []);
  assert.deepEqual(bodies(read.examples), [
    { kind: 'chat', messages: [{ role: 'user', content: 'Say "hi", politely' }, { role: 'assistant', content: 'Hi, there!' }] },
    { kind: 'chat', messages: [{ role: 'user', content: 'Count\n\n1,2,3' }, { role: 'assistant', content: 'Three\nnumbers' }] },
  ]);

  const bad = ['text,label', 'fine,1', 'too,many,fields', '"closed" trailing,2', 'short', '"never closed,3', 'x,4'].join('\n');
  const result = await readDataset(writeTemp('bad.csv', bad));
  assert.deepEqual(result.errors.map(String), [
    'bad.csv line 3: has 3 fields but the header has 2 (quote fields that contain commas)',
    'bad.csv line 4: has text after a closing quote (write a quote inside a quoted field as "")',
    'bad.csv line 5: has 1 field but the header has 2 (quote fields that contain commas)',
    'bad.csv line 6: has a quoted field opened on line 6 that is never closed',
  ]);
  assert.equal(result.examples.length, 1);

  const chat = await readDataset(writeTemp('c.csv', 'messages\n"[{""role"": ""user"", ""content"": ""x""}, {""role"": ""assistant"", ""content"": ""y""}]"\n'));
  assert.deepEqual(chat.errors.map(String), []);
  assert.deepEqual(bodies(chat.examples), [{ kind: 'chat', messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: 'y' }] }]);
  const brokenJson = 'messages\n"[{""role"": ""user"", ""content"": ""x""},"\n';
  assert.deepEqual((await readDataset(writeTemp('c.csv', brokenJson))).errors.map(String), [
    'c.csv line 2: field "messages" is not valid JSON (unexpected end of input)',
  ]);
  await assert.rejects(readDataset(writeTemp('dup.csv', 'text,text\na,b\n')), /^DataFileError: dup\.csv: the header row has column "text" twice$/);
});

test('unusable files: one clear error each, naming the file', async () => {
  const dir = path.dirname(writeTemp('x.txt', ''));
  const cases: [string, string | Uint8Array, string][] = [
    ['empty.jsonl', '', 'empty.jsonl: the file is empty'],
    ['blank.jsonl', '\ufeff\r\n  \n\n', 'blank.jsonl: the file is empty'],
    ['empty.parquet', '', 'empty.parquet: the file is empty'],
    ['nul.jsonl', Buffer.from('{"text": "a"}\n{"te\0xt": 1}\n'), 'nul.jsonl: not a text file (NUL byte at offset 18, line 2); expected UTF-8 text'],
    ['latin1.csv', Buffer.concat([Buffer.from('text\ncaf'), Buffer.from([0xe9]), Buffer.from('\n')]), 'latin1.csv: not valid UTF-8 text (invalid byte 0xe9 at offset 8, line 2); save the file as UTF-8'],
    ['notes.txt', 'hello', 'notes.txt: has an unsupported file type ".txt" (supported: .jsonl, .json, .csv, .parquet)'],
    ['README', 'hello', 'README: has no file extension (supported: .jsonl, .json, .csv, .parquet)'],
    ['none.json', '[]', 'none.json: has no rows'],
    ['wrapped-none.json', '{"version": 1, "rows": []}', 'wrapped-none.json: has no rows ("rows" is an empty array)'],
    ['header.csv', 'text\r\n', 'header.csv: has no rows'],
    ['fake.parquet', 'PAR1 but not really', 'fake.parquet: not a readable Parquet file'],
    ['odd.jsonl', '{"colour": "red"}\n', `odd.jsonl: cannot tell the dataset's shape: its rows have fields "colour"; expected one of messages`],
  ];
  for (const [name, content, expected] of cases) {
    const file = path.join(dir, name);
    fs.writeFileSync(file, content);
    await assert.rejects(readDataset(file), (err: Error) => {
      assert.ok(err instanceof DataFileError, `${name}: ${err}`);
      assert.ok(err.message.startsWith(expected), `${name}: ${err.message}`);
      assert.equal(err.file, name);
      return true;
    });
  }
  const missing = path.join(dir, 'missing.jsonl');
  await assert.rejects(readDataset(missing), { name: 'DataFileError', message: `missing.jsonl: file not found (${missing})` });
  const folder = path.join(dir, 'folder.jsonl');
  fs.mkdirSync(folder);
  await assert.rejects(readDataset(folder), { message: `folder.jsonl: is a directory, not a data file (${folder})` });
  // a folder named without an extension is still said to be a folder
  await assert.rejects(readDataset(dir), { message: `${path.basename(dir)}: is a directory, not a data file (${dir})` });
});

test('a file extension is matched case-insensitively; a valid multi-byte UTF-8 file reads', async () => {
  const file = writeTemp('UPPER.JSONL', JSON.stringify({ text: 'café 日本 🚀' }) + '\n');
  const read = await readDataset(file);
  assert.equal(read.format, 'jsonl');
  assert.deepEqual(bodies(read.examples), [{ kind: 'text', text: 'café 日本 🚀' }]);
});

test('Parquet: nested list<struct> and JSON-string conversation columns read alike', async () => {
  const nested = await readDataset(path.join(dataFixtures, 'messages.parquet'));
  const asJson = await readDataset(path.join(dataFixtures, 'messages-as-json.parquet'));
  assert.deepEqual(bodies(asJson.examples), bodies(nested.examples));
  assert.equal(asJson.shape, 'messages');
});
