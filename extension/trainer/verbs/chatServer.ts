// chat-server verb: the process behind the chat panel, talking over the IPC channel of the extension host that
// forked it. It ends when that channel closes (the panel closed, or the host went away), freeing the model.
import { ChatServer } from '../../generate/chatServer';
import { ChatMessageError, validateHostToServer, type ServerToHost } from '../../protocol/chat';
import type { OptionSpec, ParsedOptions } from '../cliArgs';
import { placementFromFlags, placementOptions } from '../placement';

export const chatServerOptions: Record<string, OptionSpec> = {
  device: placementOptions.device,
  dtype: placementOptions.dtype,
  'cuda-lib-dir': placementOptions['cuda-lib-dir'],
};

export async function chatServerVerb(o: ParsedOptions): Promise<void> {
  const send = process.send?.bind(process);
  if (!send) throw new Error('chat-server talks to the VS Code extension over an IPC channel; start it with fork(), not from a terminal (use the generate verb there)');
  // a host gone before this process heard fails the send with EPIPE: taken by the callback, the process then ends
  // on 'disconnect' as it should, not on an unhandled error
  const server = new ChatServer((message: ServerToHost) => {
    if (process.connected) send(message, undefined, undefined, () => undefined);
  }, placementFromFlags(o));
  process.on('message', (raw: unknown) => {
    try {
      void server.handle(validateHostToServer(raw));
    } catch (err) {
      const message = err instanceof ChatMessageError ? `invalid message from the extension: ${err.message}` : (err as Error).message;
      send({ type: 'error', id: null, message } satisfies ServerToHost);
    }
  });
  await new Promise<void>((resolve) => process.once('disconnect', () => resolve()));
  await server.close();
}
