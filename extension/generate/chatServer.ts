// The chat server: the process behind the chat panel (`cli.js chat-server`, forked by the extension host with an
// IPC channel; the extension host never loads the engine). It holds one loaded model and answers for two columns,
// the base model (adapter scale 0) and the finetuned one, each with its own KV cache kept between turns. Requests
// run concurrently: two answers interleave token by token, so both columns stream at once. When the host goes away
// (the panel closed), the process ends and the model is freed.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ChatMessage } from '../data';
import { sharedSystemMessage } from '../export/ollama';
import type { ChatColumnId, ChatModelInfo, ChatSettings, ChatSource, HostToServer, ServerToHost } from '../protocol/chat';
import { listCheckpoints } from '../trainer/checkpoints';
import type { PlacementOptions } from '../trainer/placement';
import { ChatColumn, loadChatModel, type ChatModel } from './chatModel';
import { evalPrompts } from './suggestions';

/** Default answer length in the panel; the model's generation_config gives the sampling defaults. */
const DEFAULT_MAX_NEW_TOKENS = 512;

export class ChatServer {
  private chat: ChatModel | null = null;
  private readonly columns = new Map<ChatColumnId, ChatColumn>();
  private readonly running = new Map<number, { controller: AbortController; done: Promise<void> }>();
  private loading: Promise<void> = Promise.resolve();

  /** placement: where models load (the chat-server verb's --device, --dtype, --cuda-lib-dir); default the CPU. */
  constructor(
    private readonly send: (message: ServerToHost) => void,
    private readonly placement: PlacementOptions = { device: 'cpu' },
  ) {}

  /** Handles one (already validated) message; generate requests run concurrently with later messages. */
  handle(message: HostToServer): Promise<void> {
    switch (message.type) {
      case 'load':
        this.loading = this.load(message.source);
        return this.loading;
      case 'generate': {
        const controller = new AbortController();
        const done = this.generate(message.id, message.column, message.messages, message.settings, controller.signal).finally(() => this.running.delete(message.id));
        this.running.set(message.id, { controller, done });
        return done;
      }
      case 'cancel':
        this.running.get(message.id)?.controller.abort();
        return Promise.resolve();
      case 'reset':
        return this.cancelAll().then(() => this.resetColumns());
    }
  }

  /** Ends every answer in progress and frees the model. */
  async close(): Promise<void> {
    await this.cancelAll();
    this.disposeModel();
  }

  private async cancelAll(): Promise<void> {
    const all = [...this.running.values()];
    for (const r of all) r.controller.abort();
    await Promise.allSettled(all.map((r) => r.done));
  }

  private disposeModel(): void {
    for (const c of this.columns.values()) c.end();
    this.columns.clear();
    this.chat?.dispose();
    this.chat = null;
  }

  private resetColumns(): void {
    if (!this.chat) return;
    for (const c of this.columns.values()) c.end();
    this.columns.clear();
    this.columns.set('base', new ChatColumn(this.chat, 0));
    if (this.chat.adapterDir !== null) this.columns.set('finetuned', new ChatColumn(this.chat, 1));
  }

  private async load(source: ChatSource): Promise<void> {
    await this.cancelAll();
    this.disposeModel();
    try {
      this.chat = await loadChatModel(source, this.placement);
      this.resetColumns();
      this.send({ type: 'loaded', info: await this.describe(source, this.chat) });
    } catch (err) {
      this.disposeModel();
      this.send({ type: 'error', id: null, message: (err as Error).message });
    }
  }

  private async describe(source: ChatSource, chat: ChatModel): Promise<ChatModelInfo> {
    const run = source.run;
    const defaults: ChatSettings = { ...chat.defaultSampling, maxNewTokens: DEFAULT_MAX_NEW_TOKENS, stopStrings: [] };
    let suggestions: string[] = [];
    let system: string | null = null;
    if (run !== undefined) {
      // Best effort: a run whose data moved still chats, without suggestions.
      suggestions = await evalPrompts(run).catch(() => []);
      system = (await sharedSystemMessage(run).catch(() => ({ system: null }))).system;
    }
    return {
      title: run !== undefined ? path.basename(run) : `${path.basename(chat.modelDir)}${chat.adapterDir ? ` + ${path.basename(chat.adapterDir)}` : ''}`,
      modelDir: chat.modelDir,
      adapterDir: chat.adapterDir,
      checkpoint: run !== undefined && source.checkpoint !== undefined ? source.checkpoint : null,
      checkpoints: run !== undefined ? listCheckpoints(run).map((c) => c.step) : [],
      hasFinalAdapter: run !== undefined && fs.existsSync(path.join(run, 'adapter', 'adapter_model.safetensors')),
      defaults,
      suggestions,
      system,
      device: chat.device,
      deviceNote: chat.deviceNote,
    };
  }

  private async generate(id: number, columnId: ChatColumnId, messages: ChatMessage[], settings: ChatSettings, signal: AbortSignal): Promise<void> {
    try {
      await this.loading;
      const column = this.columns.get(columnId);
      if (!this.chat || !column) {
        throw new Error(!this.chat ? 'no model is loaded' : 'the finetuned column needs an adapter, and none is loaded');
      }
      const { maxNewTokens, stopStrings, ...sampling } = settings;
      const r = await column.answer(messages, { sampling, maxNewTokens, stopStrings, signal, onText: (text) => this.send({ type: 'delta', id, text }) });
      this.send({
        type: 'done',
        id,
        text: r.text,
        stats: { tokens: r.ids.length, finishReason: r.finishReason, promptTokens: r.promptTokens, prefillMs: r.prefillMs, decodeMs: r.decodeMs, tokensPerSecond: r.decodeTokensPerSecond },
      });
    } catch (err) {
      this.send({ type: 'error', id, message: (err as Error).message });
    }
  }
}
