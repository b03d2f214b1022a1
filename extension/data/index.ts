/**
 * The dataset layer: reading JSONL/JSON/CSV/Parquet files, detecting and normalizing their shape, rendering chat
 * templates, tokenizing with response-only labels, shuffling, splitting, packing and inspecting.
 * Never imports vscode or the native engine, so the CLI, the trainer process and the editor can all use it.
 */
export { DataError, DataFileError, DatasetInvalidError, formatLocation } from './errors';
export type { SourceLocation } from './errors';
export { formatOf, readDataFile, SUPPORTED_EXTENSIONS } from './readers';
export type { DataFormat, RawRow, ReadResult } from './readers';
export { CHAT_ROLES, DATASET_SHAPES, detectShape, isDatasetShape, normalizeRow } from './shapes';
export type { ChatMessage, ChatRole, DatasetShape, ExampleBody, NormalizedExample } from './shapes';
export { loadDataset, readDataset } from './dataset';
export type { DatasetReadResult, LoadDatasetOptions, LoadedDataset, ReadDatasetOptions } from './dataset';
export { ADDITIONAL_TEMPLATES_DIR, loadModelTokenizer, MAX_TEMPLATE_RANGE, ModelTokenizer, tokenizerSourceFiles } from './modelTokenizer';
export { renderExample, renderGenerationPrompt, TemplateRenderError, alpacaFallbackTemplate, exportedChatTemplate, templateEndOfTurn } from './render';
export type { RenderOptions, Segment, TemplateKind } from './render';
export { IGNORE_INDEX, TOKENIZATION_VERSION, TokenizationStopped, tokenizeDataset, tokenizeDatasetAsync, tokenizeDatasetInWorkers, tokenizeExample, tokenizeSegments, tokenizationWarnings, toolsUnusedMessage } from './tokenize';
export type { TokenizationStats, TokenizeDatasetOptions, TokenizedDataset, TokenizedExample, TokenizeOptions } from './tokenize';
export { lengthHistogram, tokenLengthStats } from './stats';
export type { LengthHistogram, TokenLengthStats } from './stats';
export { mulhi32, Philox, philox4x32, RngStream } from './philox';
export { EVAL_SPLIT_STEP, shuffled, shuffleIndices, splitEval } from './shuffle';
export type { EvalSplit } from './shuffle';
export { packExamples } from './pack';
export type { PackableExample, PackedSequence } from './pack';
export { inspectDataset } from './inspect';
export type { DatasetReport, InspectedExample, InspectOptions } from './inspect';
