/**
 * Tokenizer for `make-tiny-model`: a real, small byte-level BPE tokenizer (GPT-2
 * style, as used by Llama 3 and Qwen2) written in Hugging Face layout.
 *
 * Nothing is downloaded: the merges are learned here, deterministically, from an
 * embedded English corpus, so tests and demos get a tokenizer that behaves like a
 * real one (multi-character merges, byte fallback for any UTF-8, special tokens,
 * chat template) while keeping the vocabulary at exactly 512 ids.
 *
 * Vocabulary layout (same shape as Llama 3 / Qwen2, just smaller):
 *   0..255          the 256 byte symbols, in GPT-2 `bytes_to_unicode` order
 *   256..(511 - S)  tokens created by the learned merges, in merge order
 *   (512 - S)..511  the S special tokens, as `added_tokens`
 */

/** llama: Llama 3 style; qwen2: Qwen2 style; mistral: Mistral / Llama 2 style (SentencePiece-like vocabulary). */
export type TinyArch = 'llama' | 'qwen2' | 'mistral';

/** The architectures whose tokenizer is byte-level BPE (built here); mistral's is in sentencePieceTokenizer.ts. */
export type ByteLevelArch = Exclude<TinyArch, 'mistral'>;

export interface TinyTokenizer {
  /** The tokenizer.json object. */
  tokenizerJson: Record<string, unknown>;
  /** The tokenizer_config.json object (with chat_template). */
  tokenizerConfig: Record<string, unknown>;
  /** special_tokens_map.json. */
  specialTokensMap: Record<string, unknown>;
  /** Number of ids; the model's vocab_size must equal this. */
  vocabSize: number;
  /** llama: id of "<|begin_of_text|>"; qwen2: null (Qwen has no BOS). */
  bosTokenId: number | null;
  /** End of a chat turn: llama "<|eot_id|>", qwen2 "<|im_end|>". */
  eosTokenId: number;
  /**
   * Every id that should stop generation (for generation_config.json's
   * eos_token_id list): the turn end first, then the end-of-text token, as in
   * Llama 3 Instruct ([eot_id, end_of_text]) and Qwen2 Instruct ([im_end, endoftext]).
   */
  eosTokenIds: number[];
  padTokenId: number;
}

/** Vocab size of every tiny tokenizer: a multiple of 64, as real models pad to. */
export const TINY_VOCAB_SIZE = 512;

/** The 256 single-byte symbols; merges are only learned once these exist. */
const BYTE_VOCAB_SIZE = 256;

/** Merges must be seen at least this often so each one reflects real structure. */
const MIN_PAIR_FREQUENCY = 2;

/** Llama 3's pre-tokenizer regex (Oniguruma syntax, as stored in tokenizer.json). */
const LLAMA3_SPLIT_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/** Qwen2's pattern is Llama 3's except that digits are split one by one. */
const QWEN2_SPLIT_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

interface ArchSpec {
  splitPattern: string;
  /** Specials in id order; they take the last ids of the vocabulary. */
  specials: string[];
  bos: string | null;
  eos: string;
  /** The end-of-text token, listed after `eos` in eosTokenIds. */
  endOfText: string;
  pad: string;
  chatTemplate: string;
}

// Llama 3 Instruct's template, unchanged: BOS once, then header/content/eot per
// message. Content is trimmed, as Meta's template does.
const LLAMA3_CHAT_TEMPLATE =
  "{% set loop_messages = messages %}" +
  '{% for message in loop_messages %}' +
  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}" +
  '{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}' +
  '{{ content }}' +
  '{% endfor %}' +
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

// Qwen2 Instruct's ChatML template, unchanged: a default system turn is added
// when the conversation does not start with one.
const CHATML_CHAT_TEMPLATE =
  '{% for message in messages %}' +
  "{% if loop.first and messages[0]['role'] != 'system' %}" +
  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}" +
  '{% endif %}' +
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}" +
  '{% endfor %}' +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const ARCH_SPECS: Record<ByteLevelArch, ArchSpec> = {
  // Relative order follows Llama 3 (128000, 128001, 128004, 128006, 128007, 128009).
  llama: {
    splitPattern: LLAMA3_SPLIT_PATTERN,
    specials: [
      '<|begin_of_text|>',
      '<|end_of_text|>',
      '<|finetune_right_pad_id|>',
      '<|start_header_id|>',
      '<|end_header_id|>',
      '<|eot_id|>',
    ],
    bos: '<|begin_of_text|>',
    eos: '<|eot_id|>',
    endOfText: '<|end_of_text|>',
    pad: '<|finetune_right_pad_id|>',
    chatTemplate: LLAMA3_CHAT_TEMPLATE,
  },
  // Order follows Qwen2 (151643, 151644, 151645).
  qwen2: {
    splitPattern: QWEN2_SPLIT_PATTERN,
    specials: ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
    bos: null,
    eos: '<|im_end|>',
    endOfText: '<|endoftext|>',
    pad: '<|endoftext|>',
    chatTemplate: CHATML_CHAT_TEMPLATE,
  },
};

/**
 * Training text for the merges. Varied everyday English plus chat-style Q&A, so
 * the learned merges are the ones a real tokenizer starts with (" the", "ing",
 * " and", ...) and the instruction/answer phrasing used by demos encodes compactly.
 * Editing this text changes every tiny model's vocabulary.
 */
export const TRAINING_CORPUS = [
  'Cooking at home is one of the simplest ways to eat well. Start with a few good ingredients: fresh vegetables, olive oil, garlic, salt and pepper. Heat the pan before you add the oil, then let the onions soften slowly until they turn golden. A pinch of salt at the beginning draws out the water and helps the flavor develop.',
  'To make a simple tomato sauce, cook the garlic in oil for a minute, add the chopped tomatoes and let the sauce simmer for twenty minutes. Taste it and add more salt if it needs it. Fresh basil goes in at the end, because heat destroys its delicate smell. Serve the sauce with pasta, rice or bread.',
  'Baking is more precise than cooking. Weigh the flour instead of measuring it with cups, and keep the butter cold when you make pastry. The oven should be fully heated before the bread goes in. When the crust is brown and the loaf sounds hollow, it is ready. Let it cool before you cut it, or the inside will be gummy.',
  'The weather changed quickly this afternoon. In the morning the sky was clear and the sun was warm, but by noon heavy clouds were moving in from the west. The wind picked up, the temperature dropped by ten degrees, and then the rain started. It rained for three hours, and the streets were full of water.',
  'Weather forecasts are based on measurements of pressure, temperature, humidity and wind taken all over the world. Computers use these measurements to simulate how the atmosphere will change over the next few days. The forecast for tomorrow is usually reliable, but a forecast for next week is much less certain.',
  'In winter the days are short and the nights are long and cold. Snow covers the fields, the rivers freeze, and people stay inside by the fire. In summer it is the other way around: the days are long, the evenings are warm, and everyone wants to be outside in the sun.',
  'Programming is the art of telling a computer what to do. A program is a list of instructions written in a programming language such as Python, JavaScript, TypeScript, Rust or C++. The computer follows the instructions exactly, so a small mistake in the code can change the result completely.',
  'A function takes some input, does a computation and returns a value. For example, a function that adds two numbers might be written as function add(a, b) { return a + b; }. Good functions are short, do one thing, and have names that explain what they do. Tests check that each function returns the expected value.',
  'When a program does not work, the first step is to read the error message carefully. Then try to reproduce the problem with the smallest possible input. Print the values of the variables, or use a debugger to step through the code line by line. Most bugs are simple once you can see them.',
  'Version control lets a team work on the same code at the same time. Each change is recorded with a message that explains why it was made, so it is easy to review the history and to undo a mistake. Before you merge a change, run the tests and ask a colleague to read the code.',
  'Machine learning models learn patterns from data. A language model reads a large amount of text and learns to predict the next token. Training adjusts the weights of the model to reduce the loss on the training data. Finetuning starts from a trained model and continues training on a smaller dataset for a specific task.',
  'The training loop is simple: take a batch of examples, run the model forward, compute the loss, run the backward pass to get the gradients, and update the weights with the optimizer. The learning rate controls the size of each update. If the loss does not go down, try a smaller learning rate.',
  'Question: What is the capital of France?\nAnswer: The capital of France is Paris.',
  'Question: How many days are there in a week?\nAnswer: There are 7 days in a week.',
  'Question: What is 12 plus 30?\nAnswer: 12 plus 30 is 42.',
  'Question: Why is the sky blue?\nAnswer: Sunlight is scattered by the air, and blue light is scattered more than red light, so the sky looks blue during the day.',
  'User: Can you give me a recipe for pancakes?\nAssistant: Of course! Mix 200 grams of flour, 2 eggs, 300 ml of milk and a pinch of salt. Let the batter rest for 10 minutes, then cook small amounts in a hot pan with a little butter until both sides are golden.',
  'User: What should I wear today?\nAssistant: The forecast says it will be cold and windy with some rain in the afternoon, so wear a warm jacket and take an umbrella.',
  'User: How do I reverse a list in Python?\nAssistant: You can use the reverse method, which changes the list in place: items.reverse(). If you want a new list instead, use slicing: items[::-1].',
  'User: Explain what a variable is.\nAssistant: A variable is a name that refers to a value. You can use the name in your code instead of the value, and you can change the value later. For example, x = 5 creates a variable called x with the value 5.',
  'Instruction: Summarize the following text in one sentence.\nInput: The meeting was moved from Monday to Wednesday because two of the speakers were traveling. It will start at 10 am in the main room.\nResponse: The meeting will be on Wednesday at 10 am in the main room instead of Monday.',
  'Instruction: Translate the sentence into French.\nInput: The cat is sleeping on the chair.\nResponse: Le chat dort sur la chaise.',
  'Instruction: Write a short poem about the rain.\nResponse: The rain is soft upon the roof, / it sings a song without a word; / the garden drinks, the river grows, / and every leaf is newly stirred.',
  "I'm sure you'll like it. We've tried it before, and it's the best thing we'd ever made. They're coming at 6:30, so don't be late! Is that the right answer? Yes, it is. No, it isn't. Thanks for your help, and have a nice day.",
].join('\n\n');

/**
 * GPT-2's reversible byte -> printable-character map. Printable Latin-1 bytes map
 * to themselves; the rest are shifted to U+0100 and up, so every token is
 * whitespace-free text. The returned order (printable bytes first) is also the id
 * order of the 256 base tokens, as in GPT-2, Llama 3 and Qwen2.
 */
function bytesToUnicode(): { bytes: number[]; chars: string[] } {
  const bytes: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bytes.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bytes.push(b);
  for (let b = 0xae; b <= 0xff; b++) bytes.push(b);
  const codePoints = [...bytes];
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      codePoints.push(256 + shifted);
      shifted++;
    }
  }
  return { bytes, chars: codePoints.map((c) => String.fromCodePoint(c)) };
}

/**
 * JavaScript version of a tokenizer.json split pattern. JS (Node 20) has no inline
 * `(?i:...)` group, so the contraction alternatives are spelled out with case
 * classes; the rest of the pattern is valid `u`-mode syntax as is.
 */
function toJsRegExp(pattern: string): RegExp {
  const caseInsensitiveGroup = "(?i:'s|'t|'re|'ve|'m|'ll|'d)";
  const expanded = "'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])";
  if (!pattern.startsWith(caseInsensitiveGroup)) {
    throw new Error('tiny tokenizer: unexpected split pattern');
  }
  return new RegExp(expanded + pattern.slice(caseInsensitiveGroup.length), 'gu');
}

/**
 * Pre-tokenizes text exactly as the tokenizer.json pipeline does (Split, then
 * ByteLevel without its own regex): regex pieces, each mapped to byte symbols.
 * Exported so tests can check it against the tokenizer library.
 */
export function preTokenize(arch: ByteLevelArch, text: string): string[] {
  const byteChars = byteToChar();
  const encoder = new TextEncoder();
  const pieces = text.match(toJsRegExp(ARCH_SPECS[arch].splitPattern)) ?? [];
  return pieces.map((piece) => Array.from(encoder.encode(piece), (b) => byteChars[b]).join(''));
}

/** byte value -> its GPT-2 symbol. */
function byteToChar(): string[] {
  const { bytes, chars } = bytesToUnicode();
  const table = new Array<string>(BYTE_VOCAB_SIZE);
  bytes.forEach((b, i) => (table[b] = chars[i]));
  return table;
}

/** Orders pairs by their first symbol, then their second (UTF-16 code units). */
function comparePairs(a: [string, string], b: [string, string]): number {
  if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
  if (a[1] !== b[1]) return a[1] < b[1] ? -1 : 1;
  return 0;
}

/**
 * Classic BPE training: start from byte symbols, repeatedly merge the most
 * frequent adjacent pair (ties: smallest pair lexicographically) until the
 * vocabulary holds `targetSize` tokens. A merge can recreate a token already made
 * by another route (e.g. "ab"+"c" after "a"+"bc"); it is kept, as HF's trainer
 * does, but adds no id, so the loop counts tokens rather than merges.
 */
export function learnMerges(
  words: Map<string, number>,
  baseVocab: string[],
  targetSize: number,
): { merges: [string, string][]; tokens: string[] } {
  // Each distinct word as its current symbol sequence, with its corpus count.
  const entries = [...words.entries()].map(([word, count]) => ({ symbols: [...word], count }));
  const tokens = [...baseVocab];
  const known = new Set(tokens);
  const merges: [string, string][] = [];

  while (tokens.length < targetSize) {
    // Byte symbols never contain a space (0x20 maps to "Ġ"), so "a b" is an unambiguous key.
    const counts = new Map<string, number>();
    for (const { symbols, count } of entries) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = `${symbols[i]} ${symbols[i + 1]}`;
        counts.set(key, (counts.get(key) ?? 0) + count);
      }
    }
    let best: [string, string] | null = null;
    let bestCount = 0;
    for (const [key, count] of counts) {
      const pair = key.split(' ') as [string, string];
      if (count > bestCount || (count === bestCount && best !== null && comparePairs(pair, best) < 0)) {
        best = pair;
        bestCount = count;
      }
    }
    if (best === null || bestCount < MIN_PAIR_FREQUENCY) {
      // The corpus is fixed, so this can only happen if someone shrinks it.
      throw new Error(`tiny tokenizer: corpus too small, only ${tokens.length} of ${targetSize} tokens learned`);
    }

    const [left, right] = best;
    const merged = left + right;
    merges.push([left, right]);
    if (!known.has(merged)) {
      known.add(merged);
      tokens.push(merged);
    }
    // Apply the merge left to right, without overlaps, as BPE encoding does.
    for (const entry of entries) {
      const s = entry.symbols;
      if (s.length < 2) continue;
      const out: string[] = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === left && s[i + 1] === right) {
          out.push(merged);
          i++;
        } else {
          out.push(s[i]);
        }
      }
      entry.symbols = out;
    }
  }
  return { merges, tokens };
}

/** An added_tokens entry of tokenizer.json, with the fields and order HF tokenizers writes. */
export function addedToken(id: number, content: string): Record<string, unknown> {
  return { id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true };
}

/** An added_tokens_decoder entry of tokenizer_config.json, as transformers writes it. */
export function addedTokenDecoderEntry(content: string): Record<string, unknown> {
  return { content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true };
}

/** The AddedToken dict form transformers writes into special_tokens_map.json. */
export function tokenDict(content: string): Record<string, unknown> {
  return { content, lstrip: false, normalized: false, rstrip: false, single_word: false };
}

/** Builds the complete tokenizer files for one architecture. Pure and deterministic. */
export function buildTinyTokenizer(arch: ByteLevelArch): TinyTokenizer {
  const spec = ARCH_SPECS[arch];

  // Count pre-tokenized words of the corpus, with the same split the tokenizer uses.
  const words = new Map<string, number>();
  for (const word of preTokenize(arch, TRAINING_CORPUS)) {
    words.set(word, (words.get(word) ?? 0) + 1);
  }

  const baseVocab = bytesToUnicode().chars;
  const { merges, tokens } = learnMerges(words, baseVocab, TINY_VOCAB_SIZE - spec.specials.length);

  const vocab: Record<string, number> = {};
  tokens.forEach((token, id) => (vocab[token] = id));

  const specialIds = new Map<string, number>();
  spec.specials.forEach((content, i) => specialIds.set(content, tokens.length + i));
  const idOf = (content: string): number => {
    const id = specialIds.get(content);
    if (id === undefined) throw new Error(`tiny tokenizer: ${content} is not a special token`);
    return id;
  };
  const vocabSize = tokens.length + spec.specials.length;

  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false };
  // Llama 3 prepends BOS through a TemplateProcessing step after a ByteLevel
  // (offsets-only) step; Qwen2 adds nothing, so it keeps only the ByteLevel step.
  const postProcessor =
    spec.bos === null
      ? { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false }
      : {
          type: 'Sequence',
          processors: [
            { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
            {
              type: 'TemplateProcessing',
              single: [
                { SpecialToken: { id: spec.bos, type_id: 0 } },
                { Sequence: { id: 'A', type_id: 0 } },
              ],
              pair: [
                { SpecialToken: { id: spec.bos, type_id: 0 } },
                { Sequence: { id: 'A', type_id: 0 } },
                { SpecialToken: { id: spec.bos, type_id: 1 } },
                { Sequence: { id: 'B', type_id: 1 } },
              ],
              special_tokens: {
                [spec.bos]: { id: spec.bos, ids: [idOf(spec.bos)], tokens: [spec.bos] },
              },
            },
          ],
        };

  const tokenizerJson: Record<string, unknown> = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: spec.specials.map((content) => addedToken(idOf(content), content)),
    normalizer: null,
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: spec.splitPattern }, behavior: 'Isolated', invert: false },
        byteLevel,
      ],
    },
    post_processor: postProcessor,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      // "left right" strings: read by every tokenizers release (the pair-array form
      // needs tokenizers >= 0.20) and by tokenizers.js; unambiguous because byte
      // symbols contain no spaces.
      merges: merges.map(([left, right]) => `${left} ${right}`),
    },
  };

  const addedTokensDecoder: Record<string, unknown> = {};
  for (const content of spec.specials) {
    addedTokensDecoder[String(idOf(content))] = addedTokenDecoderEntry(content);
  }

  const tokenizerConfig: Record<string, unknown> =
    arch === 'llama'
      ? {
          add_bos_token: true,
          add_eos_token: false,
          added_tokens_decoder: addedTokensDecoder,
          bos_token: spec.bos,
          chat_template: spec.chatTemplate,
          clean_up_tokenization_spaces: false,
          eos_token: spec.eos,
          model_input_names: ['input_ids', 'attention_mask'],
          model_max_length: 2048,
          pad_token: spec.pad,
          tokenizer_class: 'PreTrainedTokenizerFast',
        }
      : {
          add_bos_token: false,
          add_prefix_space: false,
          added_tokens_decoder: addedTokensDecoder,
          additional_special_tokens: ['<|im_start|>', '<|im_end|>'],
          bos_token: null,
          chat_template: spec.chatTemplate,
          clean_up_tokenization_spaces: false,
          eos_token: spec.eos,
          errors: 'replace',
          model_max_length: 2048,
          pad_token: spec.pad,
          split_special_tokens: false,
          tokenizer_class: 'PreTrainedTokenizerFast',
          unk_token: null,
        };

  const specialTokensMap: Record<string, unknown> =
    arch === 'llama'
      ? {
          bos_token: tokenDict(spec.bos as string),
          eos_token: tokenDict(spec.eos),
          pad_token: tokenDict(spec.pad),
        }
      : {
          additional_special_tokens: ['<|im_start|>', '<|im_end|>'],
          eos_token: tokenDict(spec.eos),
          pad_token: tokenDict(spec.pad),
        };

  return {
    tokenizerJson,
    tokenizerConfig,
    specialTokensMap,
    vocabSize,
    bosTokenId: spec.bos === null ? null : idOf(spec.bos),
    eosTokenId: idOf(spec.eos),
    eosTokenIds: [idOf(spec.eos), idOf(spec.endOfText)],
    padTokenId: idOf(spec.pad),
  };
}
