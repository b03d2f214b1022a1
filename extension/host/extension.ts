// The VS Code side. It never loads the native engine: anything that needs the engine runs the qlora-studio CLI
// (the same code as the trainer process) as a child process, so a native crash cannot take the editor down.
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import * as vscode from 'vscode';

interface EngineInfo {
  version: string;
  backends: string[];
  threads: number;
}

function runCli(context: vscode.ExtensionContext, args: string[]): Promise<string> {
  const cli = path.join(context.extensionPath, 'dist', 'cli.js');
  return new Promise((resolve, reject) => {
    // An argument array, never a shell string.
    execFile(process.execPath, [cli, ...args], { env: { ...process.env, ELECTRON_RUN_AS_NODE: '1' }, timeout: 60_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(stderr.trim().replace(/^qlora-studio: /, '') || err.message));
      else resolve(stdout);
    });
  });
}

export function activate(context: vscode.ExtensionContext): void {
  context.subscriptions.push(
    vscode.commands.registerCommand('qlora.showEngineInfo', async () => {
      try {
        const info = JSON.parse(await runCli(context, ['engine-info', '--json'])) as EngineInfo;
        void vscode.window.showInformationMessage(
          `QLoRA engine ${info.version}: backends ${info.backends.join(', ')}, ${info.threads} CPU threads.`,
        );
      } catch (err) {
        void vscode.window.showErrorMessage(`QLoRA Studio could not start its engine: ${err instanceof Error ? err.message : String(err)}`);
      }
    }),
  );
}

export function deactivate(): void {}
