// export-ollama: the Go-template evaluator against Go's own output (Ollama's template testdata), Ollama templates
// read off real chat templates and equal to their Jinja renderings, the Modelfile of briefly trained tiny Llama and
// Qwen2 runs, and the stop check: llama.cpp (node-llama-cpp's prebuilt CPU binary) generating greedily from a prompt
// rendered with the Modelfile's TEMPLATE stops at the end-of-turn token listed in its PARAMETER stop lines.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { test } from 'node:test';
import { Template } from '@huggingface/jinja';
import type * as NodeLlamaCpp from 'node-llama-cpp';
import { loadModelTokenizer, renderExample, TemplateRenderError, type ChatMessage } from '../../extension/data';
import { exportGguf } from '../../extension/export/exportGguf';
import { parseGoTemplate, GoTemplateError } from '../../extension/export/goTemplate';
import { exportOllama, findOnPath, modelfileText, sharedSystemMessage, type ExportOllamaReport } from '../../extension/export/ollama';
import { emitGoTemplate, fitTemplate, modelfileParameterHolds, modelfileTripleQuotedHolds, ollamaTemplate, renderOllama, UnsupportedTemplateError, type OllamaMessage, type TurnFormat } from '../../extension/export/ollamaTemplate';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { LLAMA31_DIR, QWEN3_DIR } from '../fixtures/data/helpers';
import { cliPath, repoRoot, tempDir } from '../helpers/paths';
import { trainBriefly } from '../helpers/briefRun';

const cli = { execPath: process.execPath, cliPath };

// ---------------------------------------------------------------------------------------------------------------
// The evaluator

// Three of Ollama's templates and what Go's text/template renders for them (ollama/ollama at fb30760:
// template/*.gotmpl and template/testdata/<name>.gotmpl/<conversation>, written by template_test.go).
const OLLAMA_TEMPLATES: Record<string, { template: string; expected: Record<string, string> }> = {
  'llama3-instruct': {
    template: '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
    expected: {
      user: '<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
      'system-user-assistant-user':
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    },
  },
  chatml: {
    template: '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
    expected: {
      user: '<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n',
      'user-assistant-user':
        "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n<|im_start|>assistant\n",
    },
  },
  'mistral-instruct': {
    template: '[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n{{- else if eq .Role "assistant" }} {{ .Content }}</s>[INST] {{ end }}\n{{- end }}',
    expected: {
      user: '[INST] Hello, how are you?[/INST]',
      'system-user-assistant-user':
        "[INST] You are a helpful assistant.\n\nHello, how are you?[/INST] I'm doing great. How can I help you today?</s>[INST] I'd like to show off how chat templating works![/INST]",
    },
  },
};

const OLLAMA_CONVERSATIONS: Record<string, OllamaMessage[]> = {
  user: [{ role: 'user', content: 'Hello, how are you?' }],
  'user-assistant-user': [
    { role: 'user', content: 'Hello, how are you?' },
    { role: 'assistant', content: "I'm doing great. How can I help you today?" },
    { role: 'user', content: "I'd like to show off how chat templating works!" },
  ],
  'system-user-assistant-user': [
    { role: 'system', content: 'You are a helpful assistant.' },
    { role: 'user', content: 'Hello, how are you?' },
    { role: 'assistant', content: "I'm doing great. How can I help you today?" },
    { role: 'user', content: "I'd like to show off how chat templating works!" },
  ],
};

test("the Go-template evaluator renders Ollama's own templates exactly as Go does", () => {
  let compared = 0;
  for (const [name, { template, expected }] of Object.entries(OLLAMA_TEMPLATES)) {
    const parsed = parseGoTemplate(template);
    for (const [conversation, text] of Object.entries(expected)) {
      assert.equal(renderOllama(parsed, OLLAMA_CONVERSATIONS[conversation]), text, `${name} / ${conversation}`);
      compared++;
    }
  }
  assert.equal(compared, 6);
});

test('the evaluator: trimming, scoping and assignment as in Go, and errors for what it does not support', () => {
  const run = (t: string, data: Record<string, unknown>) => parseGoTemplate(t).execute(data as never);
  assert.equal(run('a  {{- "b" -}}  \n c', {}), 'abc');
  assert.equal(run('{{ if .X }}x{{ else if .Y }}y{{ else }}z{{ end }}', { X: '', Y: [1] }), 'y');
  assert.equal(run('{{ $s := "S" }}{{ range .L }}{{ if $s }}[{{ $s }}]{{ $s = "" }}{{ end }}{{ . }}{{ end }}', { L: ['a', 'b'] }), '[S]ab');
  assert.equal(run('{{ range $i, $m := .L }}{{ $last := eq (len (slice $.L $i)) 1 }}{{ $m }}{{ if not $last }},{{ end }}{{ end }}', { L: ['a', 'b', 'c'] }), 'a,b,c');
  assert.equal(run('{{ and 1 "" 2 }}|{{ or 0 "x" }}|{{ ne "a" "b" }}|{{ index .L 1 }}', { L: ['p', 'q'] }), '|x|true|q');
  assert.equal(run('{{ range .L }}x{{ else }}empty{{ end }}{{/* a comment */}}', { L: [] }), 'empty');
  assert.throws(() => run('{{ .Missing }}', {}), /can't evaluate field Missing/);
  assert.throws(() => run('{{ range .L }}{{ $x := 1 }}{{ end }}{{ $x }}', { L: [1] }), /undefined variable: \$x/);
  assert.throws(() => parseGoTemplate('{{ .A | printf "%s" }}'), GoTemplateError);
  assert.throws(() => parseGoTemplate('{{ printf "%s" .A }}'), /"printf" is not supported/);
  assert.throws(() => parseGoTemplate('{{ if .A }}x'), /missing \{\{ end \}\}/);
  assert.throws(() => run('{{ eq .A 1 }}', { A: 'x' }), /incompatible types/);
});

// ---------------------------------------------------------------------------------------------------------------
// Templates read off real chat templates

// As published in the models' tokenizer_config.json (Llama 3.1 and Qwen2.5 without their tool-calling branches).
const LLAMA31 = [
  '{{- bos_token }}',
  '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}',
  "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}",
  '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}',
  '{{- "Cutting Knowledge Date: December 2023\\n" }}',
  '{{- "Today Date: " + date_string + "\\n\\n" }}',
  '{{- system_message }}{{- "<|eot_id|>" }}',
  '{%- for message in messages %}',
  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}",
  '{%- endfor %}',
  "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
].join('\n');
const QWEN25 =
  "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n" +
  '{%- for message in messages %}\n    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n' +
  "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";
const GEMMA2 =
  "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";
const GEMMA3 =
  "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n" +
  "{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n" +
  "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n    {{- message['content'] | trim }}\n    {{- '<end_of_turn>\\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n";
const MISTRAL_V03 =
  '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n' +
  '    {%- if message["role"] == "user" %}\n        {%- if loop.last and system_message is defined %}\n            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n        {%- else %}\n            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n' +
  '    {%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + eos_token}}\n    {%- endif %}\n{%- endfor %}\n';
const PHI3 =
  "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";
const NUMBERED = "{% for m in messages %}{{ loop.index }}. {{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}{{ (messages|length + 1) ~ '. assistant: ' }}{% endif %}";

/** A Jinja renderer as referenceRenderer builds one: BOS left out (llama.cpp adds it), template errors as TemplateRenderError. */
function jinja(source: string, bos: string, eos: string) {
  const template = new Template(source);
  return (messages: ChatMessage[], addGenerationPrompt: boolean): string => {
    let text: string;
    try {
      text = template.render({ messages, add_generation_prompt: addGenerationPrompt, bos_token: bos, eos_token: eos, date_string: '26 Jul 2024' });
    } catch (err) {
      throw new TemplateRenderError((err as Error).message);
    }
    return text.startsWith(bos) ? text.slice(bos.length) : text;
  };
}

// Conversations other than the exporter's own check set: with and without a system message, one to three turns.
const SYSTEM: ChatMessage = { role: 'system', content: 'You are a geography tutor.' };
const TURNS: ChatMessage[] = [
  { role: 'user', content: 'Where is Lyon?' },
  { role: 'assistant', content: 'In France, on the Rhône.' },
  { role: 'user', content: 'How big is it?\nRoughly.' },
  { role: 'assistant', content: 'About 520,000 people live in the city.' },
  { role: 'user', content: 'Thank you!' },
];

test('Ollama templates read off Llama 3.1, Qwen2.5, Gemma 2/3 and Mistral v0.3 templates render every conversation as Jinja does', () => {
  const cases = [
    { name: 'Llama 3.1', source: LLAMA31, bos: '<|begin_of_text|>', eos: '<|eot_id|>', close: '<|eot_id|>', system: 'turn' },
    { name: 'Qwen2.5', source: QWEN25, bos: '<|endoftext|>', eos: '<|im_end|>', close: '<|im_end|>\n', system: 'turn' },
    { name: 'Gemma 2', source: GEMMA2, bos: '<bos>', eos: '<eos>', close: '<end_of_turn>\n', system: 'none' },
    { name: 'Gemma 3', source: GEMMA3, bos: '<bos>', eos: '<eos>', close: '<end_of_turn>\n', system: 'first-user' },
    { name: 'Mistral v0.3', source: MISTRAL_V03, bos: '<s>', eos: '</s>', close: '</s>', system: 'last-user' },
  ];
  for (const c of cases) {
    const render = jinja(c.source, c.bos, c.eos);
    const { format, template } = fitTemplate(render);
    assert.equal(format.system.placement, c.system, c.name);
    assert.equal(format.assistantClose, c.close, c.name);
    const parsed = parseGoTemplate(template);
    let compared = 0;
    for (const withSystem of c.system === 'none' ? [false] : [false, true]) {
      for (let n = 1; n <= TURNS.length; n++) {
        const conversation = [...(withSystem ? [SYSTEM] : []), ...TURNS.slice(0, n)];
        const endsWithUser = conversation.at(-1)!.role === 'user';
        const ollama = renderOllama(parsed, conversation);
        if (endsWithUser) {
          assert.equal(ollama, render(conversation, true), `${c.name}: ${n} turns${withSystem ? ' with a system message' : ''}, generation prompt`);
        } else {
          // the last assistant turn is left open for Ollama to continue; closed, it is the Jinja rendering
          assert.equal(ollama + format.assistantClose, render(conversation, false), `${c.name}: ${n} turns${withSystem ? ' with a system message' : ''}`);
        }
        compared++;
      }
    }
    assert.equal(compared, c.system === 'none' ? 5 : 10);
  }
  // Llama 3.1's dated system turn is always there, with or without a system message
  const llama31 = fitTemplate(jinja(LLAMA31, '<|begin_of_text|>', '<|eot_id|>')).template;
  assert.ok(llama31.startsWith('<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{{ .System }}<|eot_id|>\n{{- range'), llama31);
  // Qwen2.5's default system turn stands in when there is none
  assert.match(fitTemplate(jinja(QWEN25, '<|endoftext|>', '<|im_end|>')).template, /\{\{ else \}\}<\|im_start\|>system\nYou are Qwen, created by Alibaba Cloud\. You are a helpful assistant\.<\|im_end\|>\n\{\{ end \}\}/);
});

test('templates that no Ollama template reproduces are refused, saying why', () => {
  assert.throws(() => fitTemplate(jinja(NUMBERED, '', '</s>')), (e: unknown) => e instanceof UnsupportedTemplateError && /a later user turn ends differently from the first/.test(e.message));
  // Phi-3 writes EOS after a finished conversation but not before the generation prompt
  assert.throws(
    () => fitTemplate(jinja(PHI3, '', '<|endoftext|>')),
    (e: unknown) => e instanceof UnsupportedTemplateError && e.message === 'adding the generation prompt changes how the conversation before it renders',
  );
});

test("Qwen3's real template (a think block on the latest answer only) is refused; Llama 3's real one is not", async () => {
  await assert.rejects(
    async () => ollamaTemplate(await loadModelTokenizer(QWEN3_DIR)),
    (e: unknown) =>
      e instanceof UnsupportedTemplateError &&
      e.message ===
        `the chat template of ${QWEN3_DIR} (tokenizer_config.json) cannot be written as an Ollama template: adding a second user turn changes how the conversation before it renders. ` +
          "export-gguf writes the GGUF with the model's own Jinja template, which llama.cpp and LM Studio apply as is",
  );
  const llama3 = ollamaTemplate(await loadModelTokenizer(LLAMA31_DIR));
  assert.equal(llama3.family, 'llama3');
  assert.deepEqual(llama3.stops, ['<|eot_id|>', '<|start_header_id|>']);
});

test('template text a Modelfile cannot hold raw ({{, non-printable characters) is written as Go string literals', () => {
  const format: TurnFormat = {
    start: '', system: { placement: 'none' }, userOpen: 'U{{x}}: ', userClose: '\n', assistantOpen: 'A: ', assistantClose: '\u0007END\n', separator: '', generation: 'A: ',
  };
  const template = emitGoTemplate(format);
  assert.ok(template.includes('\n{{- "U{{x}}: " }}\n') && template.includes('\n{{- "\\u0007END\\n" }}\n'), template);
  assert.doesNotMatch(template, /\u0007/);
  const conversation: OllamaMessage[] = [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'yo' }, { role: 'user', content: 'bye' }];
  assert.equal(renderOllama(parseGoTemplate(template), conversation), 'U{{x}}: hi\nA: yo\u0007END\nU{{x}}: bye\nA: ');
});

// ---------------------------------------------------------------------------------------------------------------
// Modelfiles of tiny models, the atomic folder, and refusals

const LLAMA3_TEMPLATE = [
  '{{- if .System }}<|start_header_id|>system<|end_header_id|>',
  '',
  '{{ .System }}<|eot_id|>',
  '{{- end }}',
  '{{- range $i, $_ := .Messages }}',
  '{{- $last := eq (len (slice $.Messages $i)) 1 }}',
  '{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>',
  '',
  '{{ .Content }}<|eot_id|>',
  '{{- if $last }}<|start_header_id|>assistant<|end_header_id|>',
  '',
  '{{ end }}',
  '{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>',
  '',
  '{{ .Content }}',
  '{{- if not $last }}<|eot_id|>',
  '{{- end }}',
  '{{- end }}',
  '{{- end }}',
].join('\n');

const CHATML_TEMPLATE = [
  '{{- if .System }}<|im_start|>system',
  '{{ .System }}<|im_end|>',
  '{{ else }}<|im_start|>system',
  'You are a helpful assistant.<|im_end|>',
  '{{ end }}',
  '{{- range $i, $_ := .Messages }}',
  '{{- $last := eq (len (slice $.Messages $i)) 1 }}',
  '{{- if eq .Role "user" }}<|im_start|>user',
  '{{ .Content }}<|im_end|>',
  '{{ if $last }}<|im_start|>assistant',
  '{{ end }}',
  '{{- else if eq .Role "assistant" }}<|im_start|>assistant',
  '{{ .Content }}',
  '{{- if not $last }}<|im_end|>',
  '{{ end }}',
  '{{- end }}',
  '{{- end }}',
].join('\n');

const LLAMA2_TEMPLATE = [
  "{{- $system := .System }}",
  "{{- range $i, $_ := .Messages }}",
  "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
  "{{- if eq .Role \"user\" }}[INST] {{ if $system }}<<SYS>>",
  "{{ $system }}",
  "<</SYS>>",
  "",
  "{{ $system = \"\" }}",
  "{{- end }}",
  "{{- .Content }} [/INST]",
  "{{- else if eq .Role \"assistant\" }} {{ .Content }}",
  "{{- if not $last }} </s><s>",
  "{{- end }}",
  "{{- end }}",
  "{{- end }}",
].join('\n');

const EXPECTED_MODELFILE = {
  llama: `FROM ./model.gguf\nTEMPLATE """${LLAMA3_TEMPLATE}"""\nPARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|end_of_text|>"\nPARAMETER stop "<|start_header_id|>"\n`,
  qwen2: `FROM ./model.gguf\nTEMPLATE """${CHATML_TEMPLATE}"""\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|im_start|>"\n`,
  // Llama 2's [INST] format (the SentencePiece-vocabulary tiny Mistral)
  mistral: `FROM ./model.gguf\nTEMPLATE """${LLAMA2_TEMPLATE}"""\nPARAMETER stop "</s>"\nPARAMETER stop "[INST]"\n`,
};

function tinyModel(arch: 'llama' | 'qwen2' | 'mistral'): string {
  const dir = path.join(tempDir(`ollama-${arch}`), 'model');
  makeTinyModel({ out: dir, arch, seed: 3, size: 'tiny' });
  return dir;
}

/** What Ollama's Modelfile parser (parser/parser.go) reads from the lines export-ollama writes. */
function readModelfile(text: string): { from: string; template: string; stops: string[]; system: string | null } {
  const from = /^FROM (.+)$/m.exec(text)?.[1];
  const template = /^TEMPLATE """([\s\S]*?)"""$/m.exec(text)?.[1];
  assert.ok(from !== undefined && template !== undefined, text);
  const stops = [...text.matchAll(/^PARAMETER stop "(.*)"$/gm)].map((m) => m[1]);
  const system = /^SYSTEM """([\s\S]*?)"""$/m.exec(text)?.[1] ?? null;
  return { from, template, stops, system };
}

test('the tiny models get Llama 3 and ChatML templates with their end-of-turn and EOS stops', async () => {
  for (const arch of ['llama', 'qwen2'] as const) {
    const t = ollamaTemplate(await loadModelTokenizer(tinyModel(arch)));
    assert.equal(t.family, arch === 'llama' ? 'llama3' : 'chatml');
    assert.equal(t.template, arch === 'llama' ? LLAMA3_TEMPLATE : CHATML_TEMPLATE);
    assert.equal(modelfileText({ template: t.template, stops: t.stops, system: null }), EXPECTED_MODELFILE[arch]);
  }
});

test("a token text a Modelfile PARAMETER cannot hold is left out of the stops, not written so that it adds directives", async () => {
  // EOS 507's text from a hostile tokenizer.json: it would end the quote and add ADAPTER / SYSTEM lines to the Modelfile
  const model = tinyModel('llama');
  const hostile = path.join(tempDir('ollama-hostile'), 'model');
  fs.cpSync(model, hostile, { recursive: true });
  const file = path.join(hostile, 'tokenizer.json');
  const evil = '<|end"""\nADAPTER /etc/passwd\nSYSTEM """pwned';
  const json = JSON.parse(fs.readFileSync(file, 'utf8')) as { added_tokens: { id: number; content: string }[] };
  json.added_tokens.find((t) => t.id === 507)!.content = evil;
  fs.writeFileSync(file, JSON.stringify(json));
  const t = ollamaTemplate(await loadModelTokenizer(hostile));
  assert.deepEqual(t.stops, ['<|eot_id|>', '<|start_header_id|>']);
  const text = modelfileText({ template: t.template, stops: t.stops, system: null });
  assert.doesNotMatch(text, /^(ADAPTER|SYSTEM)/m);
  assert.throws(() => modelfileText({ template: 'T', stops: [evil], system: null }), /a Modelfile cannot hold the parameter value/);
  for (const [value, holds] of [['<|im_end|>', true], ['say "hi" now', true], ['ends in "', true], ['a"""b', false], ['two\nlines', false], ['tab\there', false], ['</s>', true]] as const)
    assert.equal(modelfileParameterHolds(value), holds, JSON.stringify(value));
  // SYSTEM and TEMPLATE keep newlines and tabs, and may end in a quote
  for (const [value, holds] of [['two\nlines\tand a tab', true], ['Say "yes"', true], ['a"""b', false], ['bell\u0007', false]] as const)
    assert.equal(modelfileTripleQuotedHolds(value), holds, JSON.stringify(value));
});

test('a model without a chat template gets the Alpaca-style format it was trained with', async () => {
  const model = tinyModel('llama');
  const configFile = path.join(model, 'tokenizer_config.json');
  const { chat_template: _dropped, ...config } = JSON.parse(fs.readFileSync(configFile, 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(configFile, JSON.stringify(config));
  const tok = await loadModelTokenizer(model);
  const t = ollamaTemplate(tok);
  assert.equal(t.family, 'alpaca');
  assert.equal(t.source, 'alpaca-fallback');
  assert.equal(
    t.template,
    [
      '{{- if .System }}',
      '{{- .System }}',
      '',
      '{{ end }}',
      '{{- range $i, $_ := .Messages }}',
      '{{- $last := eq (len (slice $.Messages $i)) 1 }}',
      '{{- if eq .Role "user" }}### Instruction:',
      '{{ .Content }}',
      '',
      '### Response:',
      '{{ else if eq .Role "assistant" }}',
      '{{- .Content }}',
      '{{- if not $last }}<|eot_id|>',
      '',
      '{{ end }}',
      '{{- end }}',
      '{{- end }}',
    ].join('\n'),
  );
  assert.deepEqual(t.stops, ['<|eot_id|>', '<|end_of_text|>', '### Instruction:']);
  // equal to what training rendered (renderExample's fallback), BOS aside
  const parsed = parseGoTemplate(t.template);
  for (const withSystem of [false, true]) {
    for (let n = 1; n <= TURNS.length; n++) {
      const conversation = [...(withSystem ? [SYSTEM] : []), ...TURNS.slice(0, n)];
      const trained = renderExample({ kind: 'chat', messages: conversation }, tok).segments.map((x) => x.text).join('');
      const closed = conversation.at(-1)!.role === 'assistant' ? t.format.assistantClose : '';
      assert.equal('<|begin_of_text|>' + renderOllama(parsed, conversation) + closed, trained, `${n} turns${withSystem ? ' with a system message' : ''}`);
    }
  }
});

test('SYSTEM: the system message every training conversation starts with, else none', async () => {
  const dir = tempDir('ollama-system');
  const write = (name: string, rows: ChatMessage[][]) => {
    const data = path.join(dir, `${name}.jsonl`);
    fs.writeFileSync(data, rows.map((messages) => JSON.stringify({ messages })).join('\n') + '\n');
    const run = path.join(dir, name);
    fs.mkdirSync(run);
    fs.writeFileSync(path.join(run, 'config.json'), JSON.stringify({ model: 'unused', data }));
    return run;
  };
  const sys: ChatMessage = { role: 'system', content: 'You are a pirate.\nAnswer in one line.' };
  const qa = (q: string): ChatMessage[] => [{ role: 'user', content: q }, { role: 'assistant', content: `${q}, arr.` }];
  const shared = await sharedSystemMessage(write('shared', [[sys, ...qa('a')], [sys, ...qa('b')], [sys, ...qa('c')]]));
  assert.deepEqual(shared, { system: sys.content, note: 'every training conversation starts with this system message (3 conversations)' });
  assert.equal(modelfileText({ template: 'T', stops: ['<|im_end|>'], system: shared.system }), `FROM ./model.gguf\nTEMPLATE """T"""\nPARAMETER stop "<|im_end|>"\nSYSTEM """You are a pirate.\nAnswer in one line."""\n`);
  assert.equal((await sharedSystemMessage(write('mixed', [[sys, ...qa('a')], qa('b')]))).system, null);
  assert.equal((await sharedSystemMessage(write('differ', [[sys, ...qa('a')], [{ role: 'system', content: 'Other.' }, ...qa('b')]]))).system, null);
  // the sample data: 6 of its 60 conversations have a system message
  const sample = path.join(dir, 'sample');
  fs.mkdirSync(sample);
  fs.writeFileSync(path.join(sample, 'config.json'), JSON.stringify({ model: 'unused', data: path.join(repoRoot, 'examples', 'chat-sample.jsonl') }));
  assert.deepEqual(await sharedSystemMessage(sample), { system: null, note: 'the training conversations have no common system message' });
  fs.writeFileSync(path.join(sample, 'config.json'), JSON.stringify({ model: 'unused', data: path.join(dir, 'gone.jsonl') }));
  assert.equal((await sharedSystemMessage(sample)).system, null);
});

test('export-ollama refuses an unsupported template or a non-empty folder before writing anything', async () => {
  const dir = tempDir('ollama-refuse');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 0, size: 'tiny' });
  const configFile = path.join(model, 'tokenizer_config.json');
  fs.writeFileSync(configFile, JSON.stringify({ ...JSON.parse(fs.readFileSync(configFile, 'utf8')), chat_template: NUMBERED }));
  const run = path.join(dir, 'run');
  fs.mkdirSync(run);
  fs.writeFileSync(path.join(run, 'config.json'), JSON.stringify({ model, data: path.join(repoRoot, 'examples', 'chat-sample.jsonl') }));
  const out = path.join(dir, 'out');
  await assert.rejects(
    exportOllama({ run, out, type: 'f16', cli }),
    (e: unknown) =>
      e instanceof UnsupportedTemplateError &&
      e.message.includes('cannot be written as an Ollama template: a later user turn ends differently from the first') &&
      e.message.includes('export-gguf writes the GGUF with the model\'s own Jinja template'),
  );
  assert.deepEqual(fs.readdirSync(dir).sort(), ['model', 'run'], 'no output folder, no temporary folder');
  fs.mkdirSync(out);
  fs.writeFileSync(path.join(out, 'keep.txt'), 'x');
  await assert.rejects(exportOllama({ run, out, type: 'f16' }), /already exists and is not empty/);
  assert.deepEqual(fs.readdirSync(out), ['keep.txt']);
  await assert.rejects(exportOllama({ run, out: path.join(dir, 'o2'), type: 'f16', name: 'bad name!' }), /not a valid Ollama model name/);
});

// ---------------------------------------------------------------------------------------------------------------
// The stop check on briefly trained runs

async function trainedRun(arch: 'llama' | 'qwen2' | 'mistral'): Promise<string> {
  const model = tinyModel(arch);
  return trainBriefly(model);
}

const importEsm = new Function('url', 'return import(url)') as (url: string) => Promise<unknown>;
let llamaPromise: Promise<{ lib: typeof NodeLlamaCpp; llama: NodeLlamaCpp.Llama }> | undefined;

/** node-llama-cpp's prebuilt CPU binary, never built or downloaded (as extension/export/llamaCpp.ts loads it). */
function loadLlama() {
  llamaPromise ??= (async () => {
    const lib = (await importEsm(pathToFileURL(require.resolve('node-llama-cpp')).href)) as typeof NodeLlamaCpp;
    const gpu = process.platform === 'darwin' && process.arch === 'arm64' ? ('metal' as const) : false;
    const llama = await lib.getLlama({ gpu, build: 'never', skipDownload: true, usePrebuiltBinaries: true, progressLogs: false, logLevel: lib.LlamaLogLevel.error });
    return { lib, llama };
  })();
  return llamaPromise;
}

interface Generation {
  promptTokens: number[];
  tokens: number[];
  text: string;
  /** The stop string found in the output, when one ended it. */
  stoppedBy: string | null;
  lastTokenIsEog: boolean;
}

/**
 * Greedy generation in llama.cpp from `prompt`, tokenized as Ollama's llama.cpp runner does (BOS added when the
 * file asks for it, special-token text parsed), ending as Ollama ends it: at a stop string in the output, at an
 * end-of-generation token, or after `maxTokens`.
 */
async function generate(gguf: string, prompt: string, stops: readonly string[], maxTokens: number): Promise<Generation> {
  const { llama } = await loadLlama();
  const model = await llama.loadModel({ modelPath: gguf, gpuLayers: 0 });
  try {
    const context = await model.createContext({ contextSize: 256, sequences: 1, threads: 2 });
    const bos = model.tokens.shouldPrependBosToken && model.tokens.bos !== null ? [model.tokens.bos] : [];
    const promptTokens = [...bos, ...model.tokenize(prompt, true)];
    const tokens: NodeLlamaCpp.Token[] = [];
    let stoppedBy: string | null = null;
    let lastTokenIsEog = false;
    for await (const token of context.getSequence().evaluate(promptTokens, { temperature: 0, yieldEogToken: true })) {
      tokens.push(token);
      const text = model.detokenize(tokens, true);
      stoppedBy = stops.find((s) => text.includes(s)) ?? null;
      lastTokenIsEog = model.isEogToken(token);
      if (stoppedBy !== null || lastTokenIsEog || tokens.length >= maxTokens) break;
    }
    await context.dispose();
    return { promptTokens, tokens, text: model.detokenize(tokens, true), stoppedBy, lastTokenIsEog };
  } finally {
    await model.dispose();
  }
}

/** The trained runs, for the CLI test to export again. */
const runs: Partial<Record<'llama' | 'qwen2' | 'mistral', string>> = {};

for (const arch of ['llama', 'qwen2', 'mistral'] as const) {
  test(`stop check, ${arch}: llama.cpp answering a prompt from the Modelfile's TEMPLATE stops at its end-of-turn token`, async () => {
    const run = await trainedRun(arch);
    const out = path.join(path.dirname(run), 'ollama');
    const report = await exportOllama({ run, out, type: 'f16', cli });
    runs[arch] = run;
    assert.deepEqual(fs.readdirSync(out).sort(), ['Modelfile', 'model.gguf']);
    assert.deepEqual(fs.readdirSync(path.dirname(out)).sort(), ['model', 'ollama', 'run'], 'no temporary folder left');
    assert.ok(report.gguf.verification!.verified, report.gguf.verification!.problems.join('; '));
    const text = fs.readFileSync(path.join(out, 'Modelfile'), 'utf8');
    assert.equal(text, EXPECTED_MODELFILE[arch], 'chat-sample.jsonl has no system message shared by all conversations: no SYSTEM');
    assert.equal(report.name, 'run');
    assert.deepEqual(report.createCommand, ['ollama', 'create', 'run', '-f', path.join(out, 'Modelfile')]);

    const modelfile = readModelfile(text);
    assert.equal(modelfile.from, './model.gguf');
    const endOfTurn = { llama: '<|eot_id|>', qwen2: '<|im_end|>', mistral: '</s>' }[arch];
    assert.equal(modelfile.stops[0], endOfTurn);
    // a conversation from the training data, rendered as Ollama renders it
    const question = 'What is the capital of France?';
    const prompt = renderOllama(parseGoTemplate(modelfile.template), [{ role: 'user', content: question }]);
    const tok = await loadModelTokenizer(path.join(path.dirname(run), 'model'));
    const jinjaPrompt = tok.template!.render({ messages: [{ role: 'user', content: question }], add_generation_prompt: true, bos_token: tok.bosToken, eos_token: tok.eosToken });
    assert.equal((tok.addsBos ? tok.bosToken! : '') + prompt, jinjaPrompt, "the Ollama prompt is the chat template's, less the BOS llama.cpp adds");

    const maxTokens = 48;
    const g = await generate(report.gguf.file, prompt, modelfile.stops, maxTokens);
    // llama.cpp tokenizes the Ollama prompt exactly as training tokenized the chat template's prompt
    assert.deepEqual(g.promptTokens, [...(tok.addsBos && tok.bosId !== null ? [tok.bosId] : []), ...tok.encode(prompt)]);
    const last = g.tokens.at(-1)!;
    process.stderr.write(`${arch}: ${g.tokens.length} tokens generated, ${JSON.stringify(g.text)}; stopped by ${JSON.stringify(g.stoppedBy)} (token ${last}, end-of-generation in llama.cpp: ${g.lastTokenIsEog})\n`);
    assert.ok(g.tokens.length < maxTokens, `ran to ${maxTokens} tokens without stopping: ${JSON.stringify(g.text)}`);
    assert.equal(g.stoppedBy, endOfTurn, `stopped by ${g.stoppedBy}: ${JSON.stringify(g.text)}`);
    assert.equal(tok.idToToken(last), endOfTurn, 'the last token generated is the end-of-turn token');
    assert.ok(g.lastTokenIsEog, 'llama.cpp itself also ends generation at that token');
    assert.equal(g.text.indexOf(endOfTurn), g.text.length - endOfTurn.length, 'the end-of-turn token is the first stop in the output');
    // the tiny model is too small to learn the capitals in 60 steps, but it has learned the answers' form and their end
    assert.ok(g.text.trimStart().startsWith('The capital of '), g.text);

    // the control: the untrained base model, same prompt and stops, never ends its turn
    const base = path.join(tempDir(`ollama-base-${arch}`), 'base.gguf');
    await exportGguf({ model: path.join(path.dirname(run), 'model'), out: base, type: 'f16', verify: false });
    const control = await generate(base, prompt, modelfile.stops, maxTokens);
    assert.equal(control.tokens.length, maxTokens, `the untrained model stopped: ${JSON.stringify(control.text)}`);
    assert.equal(control.stoppedBy, null);
  });
}

test('the export-ollama verb: prints the create command, and --create runs ollama from the PATH with an argument array', async () => {
  const run = runs.llama ?? (await trainedRun('llama'));
  const dir = tempDir('ollama-cli');
  // a stand-in ollama that records its arguments
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  const record = path.join(dir, 'args.json');
  fs.writeFileSync(path.join(bin, 'ollama'), `#!${process.execPath}\nrequire('fs').writeFileSync(${JSON.stringify(record)}, JSON.stringify(process.argv.slice(2)));\nconsole.log('success');\n`, { mode: 0o755 });
  const env = { ...process.env, PATH: `${bin}${path.delimiter}${process.env.PATH ?? ''}` };
  assert.equal(findOnPath('ollama', env), path.join(bin, 'ollama'));
  const out = path.join(dir, 'my model');
  const stdout = execFileSync(process.execPath, [cliPath, 'export-ollama', '--run', run, '--out', out, '--type', 'q8_0', '--name', 'geo:v1', '--create', '--json'], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const report = JSON.parse(stdout) as ExportOllamaReport & { created: boolean };
  assert.equal(report.created, true);
  assert.deepEqual(JSON.parse(fs.readFileSync(record, 'utf8')), ['create', 'geo:v1', '-f', path.join(out, 'Modelfile')]);
  assert.equal(fs.readFileSync(path.join(out, 'Modelfile'), 'utf8'), EXPECTED_MODELFILE.llama);

  // without ollama on the PATH, --create is refused before any work, in one sentence
  const noOllama = { ...process.env, PATH: path.dirname(process.execPath) };
  assert.equal(findOnPath('ollama', noOllama), null);
  try {
    execFileSync(process.execPath, [cliPath, 'export-ollama', '--run', run, '--out', path.join(dir, 'o2'), '--create'], { env: noOllama, stdio: 'pipe' });
    assert.fail('expected exit 1');
  } catch (e) {
    const err = e as { status: number; stderr: Buffer };
    assert.equal(err.status, 1);
    assert.match(err.stderr.toString(), /--create needs the ollama command on the PATH/);
  }
  assert.equal(fs.existsSync(path.join(dir, 'o2')), false);
  // the plain run (default type q4_k_m) prints the command to paste, and removes what a killed export left behind
  const stale = path.join(dir, 'o3.tmp-99999999');
  fs.mkdirSync(stale);
  fs.writeFileSync(path.join(stale, 'model.gguf'), 'half');
  const text = execFileSync(process.execPath, [cliPath, 'export-ollama', '--run', run, '--out', path.join(dir, 'o3')], { env: noOllama, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  assert.match(text, /model\.gguf \(q4_k_m, [0-9.]+ MiB, verified in llama\.cpp/);
  assert.equal(fs.existsSync(stale), false);
  assert.match(text, new RegExp(`ollama create run -f ${path.join(dir, 'o3', 'Modelfile').replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}\n`));
  assert.match(text, /template: llama3 \(from the model's chat template\), stops at <\|eot_id\|> <\|end_of_text\|> <\|start_header_id\|>/);
});
