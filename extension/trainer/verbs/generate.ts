// generate verb: an answer from a model, a model + adapter, or a run (any checkpoint), streamed to stdout; with
// --compare, the base model's answer and the finetuned one for the same prompt and seed, one after the other.
import { CHAT_ROLES, TemplateRenderError, type ChatMessage, type ChatRole } from '../../data';
import { ChatColumn, loadChatModel } from '../../generate/chatModel';
import type { GenerateResult } from '../../generate/generate';
import { samplingProblem, type SamplingOptions } from '../../generate/sampling';
import { integerOption, listOption, numberOption, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { placementFromFlags, placementOptions } from '../placement';
import { readJsonFile } from '../../util/jsonFile';
import { adapterFlag } from './export';

export const generateOptions: Record<string, OptionSpec> = {
  model: { type: 'string', description: 'a base model folder (Hugging Face layout)' },
  adapter: { type: 'string', description: 'a PEFT LoRA adapter folder to apply to --model' },
  run: { type: 'string', description: "a run folder: its base model and adapter (instead of --model/--adapter)" },
  checkpoint: { type: 'string', description: "with --run: a checkpoint step's adapter instead of the final one" },
  prompt: { type: 'string', description: 'the user message (rendered with the model\'s chat template)' },
  messages: { type: 'string', description: 'a JSON file with a conversation [{"role": "user"|"assistant"|"system", "content": "..."}] ending with a user turn' },
  system: { type: 'string', description: 'a system message before the conversation' },
  raw: { type: 'boolean', description: 'continue --prompt as plain text, without the chat template' },
  compare: { type: 'boolean', description: 'answer with the base model and with the adapter, one after the other (same prompt and seed)' },
  temperature: { type: 'string', description: "sampling temperature; 0 = greedy (default: the model's generation_config.json as transformers reads it, greedy unless do_sample is true; without one 0.7)" },
  'top-k': { type: 'string', description: 'keep the k most likely tokens (0 = off)' },
  'top-p': { type: 'string', description: 'nucleus sampling: keep the most likely tokens up to this probability mass (1 = off)' },
  'min-p': { type: 'string', description: 'drop tokens less likely than this fraction of the most likely one (0 = off)' },
  'repetition-penalty': { type: 'string', description: "transformers' repetition penalty (1 = off)" },
  seed: { type: 'string', description: 'seed of the draws (default 0): the same seed gives the same answer' },
  'max-new-tokens': { type: 'string', description: 'most tokens to generate (default 256)' },
  stop: { type: 'string', repeatable: true, description: 'a string that ends the answer (repeatable)' },
  quantize: { type: 'boolean', description: 'store the base weights as NF4 (as QLoRA training; --run does what the run did)' },
  device: { ...placementOptions.device, description: 'auto (default: the GPU when it can be used and the model fits there, else the CPU), cuda or cpu' },
  dtype: placementOptions.dtype,
  'cuda-lib-dir': placementOptions['cuda-lib-dir'],
  json: { type: 'boolean', description: 'print the answers as JSON (no streaming)' },
};

/** The conversation to answer, from --prompt or --messages, with --system in front. */
export function conversationFrom(o: ParsedOptions): ChatMessage[] {
  const prompt = stringOption(o, 'prompt');
  const file = stringOption(o, 'messages');
  if ((prompt === undefined) === (file === undefined)) throw new UsageError('give the question as --prompt TEXT or --messages FILE (one of them)');
  let messages: ChatMessage[];
  if (prompt !== undefined) messages = [{ role: 'user', content: prompt }];
  else {
    const parsed = readJsonFile(file!);
    if (!Array.isArray(parsed) || parsed.length === 0) throw new Error(`${file}: expected a non-empty JSON array of {role, content} messages`);
    messages = parsed.map((m, i) => {
      const msg = m as { role?: unknown; content?: unknown };
      if (typeof msg.role !== 'string' || !(CHAT_ROLES as readonly string[]).includes(msg.role)) throw new Error(`${file}: message ${i + 1} has role ${JSON.stringify(msg.role)}, expected one of ${CHAT_ROLES.join(', ')}`);
      if (typeof msg.content !== 'string') throw new Error(`${file}: message ${i + 1} has no text content`);
      return { role: msg.role as ChatRole, content: msg.content };
    });
  }
  const system = stringOption(o, 'system');
  if (system !== undefined) {
    if (messages[0].role === 'system') throw new UsageError('--system given, but the conversation already starts with a system message');
    messages.unshift({ role: 'system', content: system });
  }
  if (messages[messages.length - 1].role !== 'user') throw new Error('the conversation must end with a user message, which the model then answers');
  return messages;
}


export async function generateVerb(o: ParsedOptions): Promise<void> {
  const messages = conversationFrom(o);
  if (o.raw && stringOption(o, 'prompt') === undefined) throw new UsageError('--raw continues --prompt as plain text; it does not apply to --messages');
  if (o.raw && stringOption(o, 'system') !== undefined) throw new UsageError('--raw continues --prompt as plain text, without the chat template that would hold --system; put the text in --prompt');
  const checkpoint = stringOption(o, 'checkpoint') === undefined ? undefined : integerOption(o, 'checkpoint', 0);
  const chat = await loadChatModel({
    model: stringOption(o, 'model'),
    adapter: adapterFlag(o, { runFlag: true }),
    run: stringOption(o, 'run'),
    checkpoint,
    quantize: o.quantize ? true : undefined,
  }, placementFromFlags(o));
  if (chat.deviceNote && !o.json) process.stderr.write(`${chat.deviceNote}\n`);
  try {
    if (o.compare && chat.adapterDir === null) throw new UsageError('--compare needs an adapter: give --run, or --model with --adapter');
    const sampling: SamplingOptions = {
      temperature: numberOption(o, 'temperature') ?? chat.defaultSampling.temperature,
      topK: numberOption(o, 'top-k') ?? chat.defaultSampling.topK,
      topP: numberOption(o, 'top-p') ?? chat.defaultSampling.topP,
      minP: numberOption(o, 'min-p') ?? chat.defaultSampling.minP,
      repetitionPenalty: numberOption(o, 'repetition-penalty') ?? chat.defaultSampling.repetitionPenalty,
      seed: integerOption(o, 'seed', 0),
    };
    const problem = samplingProblem(sampling);
    if (problem) throw new UsageError(problem);
    const maxNewTokens = integerOption(o, 'max-new-tokens', 256);
    if (maxNewTokens < 1) throw new UsageError(`--max-new-tokens must be at least 1, got ${maxNewTokens}`);
    const json = Boolean(o.json);
    const controller = new AbortController();
    const onSigint = () => controller.abort();
    process.once('SIGINT', onSigint);

    const columns: { label: string; scale: number }[] = o.compare
      ? [{ label: 'base', scale: 0 }, { label: 'finetuned', scale: 1 }]
      : [{ label: chat.adapterDir === null ? 'base' : 'finetuned', scale: chat.adapterDir === null ? 0 : 1 }];
    const prompt = o.raw ? [...(chat.tok.addsBos && chat.tok.bosId !== null ? [chat.tok.bosId] : []), ...chat.tok.encode(stringOption(o, 'prompt')!)] : null;
    const answers: (GenerateResult & { label: string })[] = [];
    try {
      for (const c of columns) {
        if (controller.signal.aborted) break;
        if (o.compare && !json) process.stdout.write(`── ${c.label} ${'─'.repeat(Math.max(0, 60 - c.label.length))}\n`);
        const column = new ChatColumn(chat, c.scale);
        const options = {
          sampling,
          maxNewTokens,
          stopStrings: listOption(o, 'stop'),
          signal: controller.signal,
          onText: json ? undefined : (delta: string) => process.stdout.write(delta),
        };
        let r: GenerateResult;
        try {
          r = prompt !== null ? await column.answerIds(prompt, options) : await column.answer(messages, options);
        } catch (err) {
          // the template's refusal is of the conversation in --messages: say which file holds it
          const file = stringOption(o, 'messages');
          if (err instanceof TemplateRenderError && file !== undefined) throw new Error(`${file}: the model's ${err.message}`);
          throw err;
        }
        column.end();
        answers.push({ ...r, label: c.label });
        if (!json) {
          process.stdout.write('\n');
          process.stderr.write(`[${c.label}: ${r.ids.length} tokens, ${finishText(r)}; prompt ${r.promptTokens} tokens in ${(r.prefillMs / 1000).toFixed(2)} s, ${r.decodeTokensPerSecond.toFixed(1)} tokens/s]\n`);
        }
      }
    } finally {
      process.off('SIGINT', onSigint);
    }
    if (json) {
      process.stdout.write(JSON.stringify({
        model: chat.modelDir,
        adapter: chat.adapterDir,
        device: chat.device,
        deviceNote: chat.deviceNote,
        sampling,
        answers: answers.map((a) => ({ label: a.label, text: a.text, ids: a.ids, finishReason: a.finishReason, promptTokens: a.promptTokens, prefillMs: a.prefillMs, decodeMs: a.decodeMs, decodeTokensPerSecond: a.decodeTokensPerSecond })),
      }) + '\n');
    }
  } finally {
    chat.dispose();
  }
}

function finishText(r: GenerateResult): string {
  switch (r.finishReason) {
    case 'stop-token': return 'stopped at the end-of-turn token';
    case 'stop-string': return 'stopped at a stop string';
    case 'length': return 'reached the token limit';
    case 'context': return "reached the model's context length";
    case 'cancelled': return 'cancelled';
  }
}
