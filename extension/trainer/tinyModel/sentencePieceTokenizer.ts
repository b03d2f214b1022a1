/**
 * The tiny tokenizer in the style of Llama 2 and Mistral: a SentencePiece BPE vocabulary as Hugging Face stores it
 * in tokenizer.json (model BPE with byte_fallback, "▁" for spaces, a "▁" prepended to each text section, no
 * pre-tokenizer), learned here from the same embedded corpus as the byte-level tokenizers.
 *
 * Vocabulary layout (Llama 2's, just smaller):
 *   0, 1, 2      <unk>, <s>, </s>
 *   3..258       the byte tokens <0x00>..<0xFF>, used for characters outside the vocabulary (byte fallback)
 *   259..        pieces created by the learned merges, in merge order
 *   ..511        the single characters of the corpus (newline excepted: it is always a byte token, as in Llama 2)
 *
 * The merge list is written as Hugging Face's converter writes it for SentencePiece models: every split of every
 * merged piece into two vocabulary entries, ordered by the piece's rank, so that Hugging Face's BPE and
 * SentencePiece's highest-score-first merging (llama.cpp's "llama" tokenizer) agree.
 */
import {
  addedToken,
  addedTokenDecoderEntry,
  learnMerges,
  TINY_VOCAB_SIZE,
  tokenDict,
  TRAINING_CORPUS,
  type TinyTokenizer,
} from './tokenizer';

const SPACE = '\u2581'; // "▁"
const UNK = '<unk>';
const BOS = '<s>';
const EOS = '</s>';
const SPECIALS = [UNK, BOS, EOS];

// Llama 2 Chat's template, unchanged: an optional <<SYS>> block inside the first user turn, [INST] ... [/INST]
// around each user turn, BOS before each user turn and EOS after each answer (Mistral Instruct's is the same
// without the system block).
const LLAMA2_CHAT_TEMPLATE =
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}" +
  '{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}' +
  '{% for message in loop_messages %}' +
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}" +
  "{% else %}{% set content = message['content'] %}{% endif %}" +
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}" +
  "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}" +
  '{% endfor %}';

/** Corpus words as SentencePiece sees them: split at whitespace, each with its "▁" prefix. */
function corpusWords(): Map<string, number> {
  const words = new Map<string, number>();
  for (const word of TRAINING_CORPUS.split(/\s+/)) {
    if (word === '') continue;
    const piece = SPACE + word;
    words.set(piece, (words.get(piece) ?? 0) + 1);
  }
  return words;
}

/** Every split of each merged piece into two vocabulary entries, in the pieces' order (the converter's merges). */
function mergesFromPieces(pieces: string[], vocab: Record<string, number>): string[] {
  const merges: string[] = [];
  for (const piece of pieces) {
    const chars = [...piece];
    for (let cut = 1; cut < chars.length; cut++) {
      const left = chars.slice(0, cut).join('');
      const right = chars.slice(cut).join('');
      if (left in vocab && right in vocab) merges.push(`${left} ${right}`);
    }
  }
  return merges;
}

const byteToken = (b: number) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`;

/** Builds the complete tokenizer files. Pure and deterministic. */
export function buildSentencePieceTokenizer(): TinyTokenizer {
  const words = corpusWords();
  const chars = [...new Set([...words.keys()].flatMap((w) => [...w]))].sort();
  const fixed = SPECIALS.length + 256;
  // the same BPE training as the byte-level tokenizers, over characters; the merged pieces follow the characters
  const pieces = learnMerges(words, chars, TINY_VOCAB_SIZE - fixed).tokens.slice(chars.length);

  const vocab: Record<string, number> = {};
  const order = [...SPECIALS, ...Array.from({ length: 256 }, (_, b) => byteToken(b)), ...pieces, ...chars];
  order.forEach((token, id) => (vocab[token] = id));
  if (order.length !== TINY_VOCAB_SIZE || Object.keys(vocab).length !== TINY_VOCAB_SIZE) {
    throw new Error('tiny SentencePiece tokenizer: vocabulary entries are not unique');
  }

  const tokenizerJson: Record<string, unknown> = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIALS.map((content) => addedToken(vocab[content], content)),
    normalizer: {
      type: 'Sequence',
      normalizers: [
        { type: 'Prepend', prepend: SPACE },
        { type: 'Replace', pattern: { String: ' ' }, content: SPACE },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: BOS, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: BOS, type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: BOS, type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [BOS]: { id: BOS, ids: [vocab[BOS]], tokens: [BOS] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: SPACE }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: UNK,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: mergesFromPieces(pieces, vocab),
    },
  };

  const addedTokensDecoder: Record<string, unknown> = {};
  for (const content of SPECIALS) addedTokensDecoder[String(vocab[content])] = addedTokenDecoderEntry(content);

  const tokenizerConfig: Record<string, unknown> = {
    add_bos_token: true,
    add_eos_token: false,
    added_tokens_decoder: addedTokensDecoder,
    bos_token: BOS,
    chat_template: LLAMA2_CHAT_TEMPLATE,
    clean_up_tokenization_spaces: false,
    eos_token: EOS,
    legacy: true,
    model_max_length: 2048,
    pad_token: UNK,
    spaces_between_special_tokens: false,
    tokenizer_class: 'PreTrainedTokenizerFast',
    unk_token: UNK,
  };

  return {
    tokenizerJson,
    tokenizerConfig,
    specialTokensMap: { bos_token: tokenDict(BOS), eos_token: tokenDict(EOS), pad_token: tokenDict(UNK), unk_token: tokenDict(UNK) },
    vocabSize: TINY_VOCAB_SIZE,
    bosTokenId: vocab[BOS],
    eosTokenId: vocab[EOS],
    eosTokenIds: [vocab[EOS]],
    padTokenId: vocab[UNK],
  };
}
