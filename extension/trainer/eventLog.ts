// Where the trainer's events go: appended, one JSON line each, to <run>/events.jsonl (the source of truth a window
// reload reads back) and, when this process was forked by the extension host, sent over IPC as well.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { serializeEvent, validateEvent, type TrainerEvent } from '../protocol/events';

// Distributes Omit over the union so each event keeps its own fields.
type WithoutTime<T> = T extends unknown ? Omit<T, 'time'> : never;
export type NewEvent = WithoutTime<TrainerEvent>;

/**
 * To the extension host, when this process was forked by it. The host may be gone before this process has heard
 * (the channel then fails with EPIPE): the callback takes the error, which would otherwise end the process.
 */
export function sendToHost(message: object): void {
  if (process.send && process.connected) process.send(message, undefined, undefined, () => undefined);
}

export class EventLog {
  private readonly fd: number;
  private readonly listeners: ((e: TrainerEvent) => void)[] = [];

  constructor(readonly runDir: string) {
    this.fd = fs.openSync(path.join(runDir, 'events.jsonl'), 'a');
  }

  onEvent(listener: (e: TrainerEvent) => void): void {
    this.listeners.push(listener);
  }

  emit(partial: NewEvent): TrainerEvent {
    // What is checked is the line as written (a non-finite number becomes null there), so that every line this
    // writes reads back: an event that would not is a bug here, not a log that no reader can open.
    const line = serializeEvent({ ...partial, time: new Date().toISOString() } as TrainerEvent);
    const event = validateEvent(JSON.parse(line));
    // One write per line, so a kill leaves at most a partial last line, which readers skip.
    fs.writeSync(this.fd, line + '\n');
    sendToHost(event);
    for (const l of this.listeners) l(event);
    return event;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
