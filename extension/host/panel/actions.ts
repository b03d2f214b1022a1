// What a panel button does: the webview's {action} message checked against the run the panel shows and mapped to
// the command that acts on it. Pure (no vscode import) so the rules are unit-tested; the providers execute the
// result.
import * as path from 'node:path';
import type { PanelAction, WebviewToHost } from '../../protocol/webview';

export const ACTION_COMMANDS: Record<PanelAction, string> = {
  stop: 'qlora.stopTraining',
  resume: 'qlora.resumeRun',
  try: 'qlora.tryModel',
  export: 'qlora.exportAdapter',
  merge: 'qlora.mergeAndSave',
  gguf: 'qlora.exportGguf',
  openFolder: 'qlora.revealRun',
  newFinetune: 'qlora.newFinetune',
};

export type ActionResult = { command: string; args: unknown[] } | { rejected: string };

/**
 * The command for a button press, or why it is refused. Every run action must name the run on show (a stale
 * webview must not act on another run); New Finetune needs no run and takes no argument (its argument is an
 * options object, not a run).
 */
export function resolveAction(message: Extract<WebviewToHost, { type: 'action' }>, shownRunDir: string | undefined): ActionResult {
  if (message.action === 'newFinetune') return { command: ACTION_COMMANDS.newFinetune, args: [] };
  if (shownRunDir === undefined) return { rejected: `"${message.action}" with no run on show` };
  if (message.runDir === null || path.resolve(message.runDir) !== path.resolve(shownRunDir))
    return { rejected: `"${message.action}" for ${JSON.stringify(message.runDir)}, but the panel shows ${shownRunDir}` };
  return { command: ACTION_COMMANDS[message.action], args: [shownRunDir] };
}
