// One chat panel's conversation, between its webview and the chat server: the turns so far with each column's
// answers (the base and the finetuned model each continue their own conversation), what is being generated, the
// checkpoint loaded. Webview messages arrive validated; this decides what to ask the server and what to show.
// No vscode import, so it is unit-tested with a fake server.
import type { ChatMessage } from '../../data/shapes';
import type { AnswerStats, ChatColumnId, ChatHostToWebview, ChatModelInfo, ChatSettings, ChatSource, ChatWebviewToHost } from '../../protocol/chat';
import type { ChatAnswer } from './chatProcess';

/** What the session needs of the chat process (ChatProcess, or a fake in tests). */
export interface ChatBackend {
  load(source: ChatSource): Promise<ChatModelInfo>;
  generate(column: ChatColumnId, messages: ChatMessage[], settings: ChatSettings, onDelta: (text: string) => void): { id: number; done: Promise<ChatAnswer> };
  cancel(id: number): void;
  reset(): void;
}

interface Turn {
  prompt: string;
  system: string;
  answers: Partial<Record<ChatColumnId, string>>;
  stats: Partial<Record<ChatColumnId, AnswerStats>>;
}

export class ChatSession {
  private info: ChatModelInfo | null = null;
  private loadError: string | null = null;
  private turns: Turn[] = [];
  /** Answers being written, by request id, each settling when its answer is done (or failed). */
  private readonly running = new Map<number, Promise<void>>();
  private loading: Promise<void> | null = null;

  constructor(
    private readonly backend: ChatBackend,
    private readonly post: (message: ChatHostToWebview) => void,
    private source: ChatSource,
  ) {}

  /** Loads the model named by the source; the webview hears about it. */
  start(): Promise<void> {
    this.loading = this.load();
    return this.loading;
  }

  get busy(): boolean {
    return this.running.size > 0;
  }

  get columns(): ChatColumnId[] {
    return this.info?.adapterDir ? ['base', 'finetuned'] : ['base'];
  }

  /** The text of one answer, for Copy. */
  answerText(column: ChatColumnId, turn: number): string | undefined {
    return this.turns[turn]?.answers[column];
  }

  async handle(message: ChatWebviewToHost): Promise<void> {
    switch (message.type) {
      case 'ready':
        this.replay();
        return;
      case 'ask':
        return this.ask(message.prompt, message.system, message.settings);
      case 'stop':
        for (const id of this.running.keys()) this.backend.cancel(id);
        return;
      case 'clear':
        await this.stopAll();
        this.turns = [];
        this.backend.reset();
        this.post({ type: 'cleared' });
        return;
      case 'checkpoint':
        return this.switchCheckpoint(message.step);
      case 'copy':
        return;
    }
  }

  /** The adapter of another checkpoint of the run (null: its final adapter); the conversation starts over. */
  async switchCheckpoint(step: number | null): Promise<void> {
    if (this.source.run === undefined) return;
    await this.stopAll();
    this.turns = [];
    this.source = { run: this.source.run, ...(step === null ? {} : { checkpoint: step }) };
    this.post({ type: 'cleared' });
    this.loading = this.load();
    return this.loading;
  }

  /** The checkpoint the panel shows (undefined: the run's final adapter, or no run). */
  get checkpoint(): number | undefined {
    return this.source.checkpoint;
  }

  private async load(): Promise<void> {
    this.info = null;
    this.loadError = null;
    const what = this.source.checkpoint !== undefined ? `the adapter of step ${this.source.checkpoint}` : 'the model';
    this.post({ type: 'loading', message: `Loading ${what}…` });
    try {
      this.info = await this.backend.load(this.source);
      this.post({ type: 'loaded', info: this.info });
    } catch (err) {
      this.loadError = (err as Error).message;
      this.post({ type: 'error', message: `The model could not be loaded: ${this.loadError}` });
    }
  }

  /** A webview that (re)loaded: the model and the conversation so far. */
  private replay(): void {
    if (this.info === null) {
      this.post(this.loadError !== null ? { type: 'error', message: `The model could not be loaded: ${this.loadError}` } : { type: 'loading', message: 'Loading the model…' });
      return;
    }
    this.post({ type: 'loaded', info: this.info });
    this.turns.forEach((t, turn) => {
      this.post({ type: 'turn', turn, prompt: t.prompt });
      for (const column of this.columns) {
        const text = t.answers[column];
        if (text !== undefined) this.post({ type: 'delta', column, turn, text });
        const stats = t.stats[column];
        if (stats !== undefined) this.post({ type: 'done', column, turn, stats });
      }
    });
  }

  private async stopAll(): Promise<void> {
    for (const id of this.running.keys()) this.backend.cancel(id);
    await Promise.all(this.running.values());
  }

  /** The conversation as `column` has seen it, ending with the new prompt. */
  private messagesFor(column: ChatColumnId, earlier: readonly Turn[], prompt: string, system: string): ChatMessage[] {
    const messages: ChatMessage[] = [];
    if (system.trim() !== '') messages.push({ role: 'system', content: system });
    for (const t of earlier) {
      messages.push({ role: 'user', content: t.prompt });
      messages.push({ role: 'assistant', content: t.answers[column] ?? '' });
    }
    messages.push({ role: 'user', content: prompt });
    return messages;
  }

  private async ask(prompt: string, system: string, settings: ChatSettings): Promise<void> {
    if (this.loading) await this.loading;
    if (this.info === null) {
      this.post({ type: 'error', message: 'No model is loaded; close the panel and try again.' });
      return;
    }
    if (this.busy) {
      this.post({ type: 'error', message: 'An answer is still being written; stop it first.' });
      return;
    }
    // A changed system prompt starts the conversation over: earlier answers were given under the old one.
    if (this.turns.length > 0 && this.turns[0].system !== system) {
      this.turns = [];
      this.post({ type: 'cleared' });
    }
    const turn = this.turns.length;
    const earlier = [...this.turns];
    const entry: Turn = { prompt, system, answers: {}, stats: {} };
    this.turns.push(entry);
    this.post({ type: 'turn', turn, prompt });
    const requests = this.columns.map((column) => {
      const messages = this.messagesFor(column, earlier, prompt, system);
      entry.answers[column] = '';
      const { id, done } = this.backend.generate(column, messages, settings, (text) => {
        entry.answers[column] += text;
        this.post({ type: 'delta', column, turn, text });
      });
      const settled = done.then(
        (answer) => {
          entry.answers[column] = answer.text;
          entry.stats[column] = answer.stats;
          this.post({ type: 'done', column, turn, stats: answer.stats });
        },
        (err: Error) => {
          this.post({ type: 'error', message: `${column === 'base' ? 'Base' : 'Finetuned'} model: ${err.message}` });
          entry.stats[column] = { tokens: 0, finishReason: 'cancelled', promptTokens: 0, prefillMs: 0, decodeMs: 0, tokensPerSecond: 0 };
          this.post({ type: 'done', column, turn, stats: entry.stats[column] });
        },
      ).finally(() => this.running.delete(id));
      this.running.set(id, settled);
      return settled;
    });
    await Promise.all(requests);
  }
}
