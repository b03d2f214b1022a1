// Chat panels ("QLoRA: Try Model..."): one editor panel per model or run, each with its own chat server process
// that holds the model while the panel is open and frees it when the panel closes. The webview is untrusted: each
// message is validated before the session acts on it.
import * as path from 'node:path';
import * as vscode from 'vscode';
import { validateChatWebviewMessage, type ChatHostToWebview, type ChatSource } from '../../protocol/chat';
import { webviewHtml, webviewOptions } from '../panel/session';
import type { OutputSink, TrainerLaunch } from '../trainerProcess';
import { ChatProcess } from './chatProcess';
import { ChatSession } from './chatSession';

export const CHAT_PANEL_TYPE = 'qlora.chatPanel';

interface OpenChat {
  panel: vscode.WebviewPanel;
  session: ChatSession;
  process: ChatProcess;
  title: string;
}

/** What the e2e suite can see of the open chat panels. */
export interface ChatPanelInfo {
  key: string;
  title: string;
  pid: number | undefined;
}

export function chatKey(source: ChatSource): string {
  return source.run !== undefined ? `run:${path.resolve(source.run)}` : `model:${path.resolve(source.model ?? '')}|${source.adapter ? path.resolve(source.adapter) : ''}`;
}

export class ChatPanels implements vscode.Disposable {
  private readonly open_ = new Map<string, OpenChat>();

  constructor(
    private readonly extensionUri: vscode.Uri,
    private readonly launch: () => TrainerLaunch,
    private readonly output: OutputSink,
    /** The chat server's options from the settings, read when a chat opens. */
    private readonly serverArgs: () => string[] = () => [],
  ) {}

  list(): ChatPanelInfo[] {
    return [...this.open_.entries()].map(([key, c]) => ({ key, title: c.title, pid: c.process.pid }));
  }

  /** Shows the chat for `source`, starting its server and loading the model if it is not open yet. */
  open(source: ChatSource): vscode.WebviewPanel {
    const key = chatKey(source);
    const existing = this.open_.get(key);
    if (existing) {
      existing.panel.reveal();
      // Try on a checkpoint of a run whose chat is open: that panel switches to it (a plain Try keeps what it shows)
      if (source.checkpoint !== undefined && source.checkpoint !== existing.session.checkpoint) void existing.session.switchCheckpoint(source.checkpoint);
      return existing.panel;
    }
    const title = `Try ${path.basename(source.run ?? source.adapter ?? source.model ?? 'model')}`;
    const panel = vscode.window.createWebviewPanel(CHAT_PANEL_TYPE, title, vscode.ViewColumn.Active, {
      ...webviewOptions(this.extensionUri),
      retainContextWhenHidden: false,
    });
    panel.iconPath = vscode.Uri.joinPath(this.extensionUri, 'media', 'icon.svg');
    panel.webview.html = webviewHtml(panel.webview, this.extensionUri, title, 'chat');

    const process = new ChatProcess(this.launch(), this.output, undefined, this.serverArgs());
    const post = (message: ChatHostToWebview) => void panel.webview.postMessage(message);
    const session = new ChatSession(process, post, source);
    const chat: OpenChat = { panel, session, process, title };
    this.open_.set(key, chat);

    const subscription = panel.webview.onDidReceiveMessage(async (raw: unknown) => {
      let message;
      try {
        message = validateChatWebviewMessage(raw);
      } catch (err) {
        this.output.appendLine(`[chat] dropped an invalid webview message: ${(err as Error).message}`);
        return;
      }
      if (message.type === 'copy') {
        const text = session.answerText(message.column, message.turn);
        let ok = false;
        if (text !== undefined) {
          try {
            await vscode.env.clipboard.writeText(text);
            ok = true;
          } catch (err) {
            this.output.appendLine(`[chat] the clipboard refused the answer: ${(err as Error).message}`);
          }
        }
        post({ type: 'copied', column: message.column, turn: message.turn, ok });
        return;
      }
      await session.handle(message);
    });
    panel.onDidDispose(() => {
      subscription.dispose();
      this.open_.delete(key);
      void process.dispose();
    });
    void session.start();
    return panel;
  }

  dispose(): void {
    for (const c of [...this.open_.values()]) c.panel.dispose();
  }
}
