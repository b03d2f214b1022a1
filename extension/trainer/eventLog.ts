// Where the trainer's events go: appended, one JSON line each, to <run>/events.jsonl (the source of truth a window
// reload reads back) and, when this process was forked by the extension host, sent over IPC as well.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { serializeEvent, validateEvent, type TrainerEvent } from '../protocol/events';

// Distributes Omit over the union so each event keeps its own fields.
type WithoutTime<T> = T extends unknown ? Omit<T, 'time'> : never;
export type NewEvent = WithoutTime<TrainerEvent>;

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
    const event = validateEvent({ ...partial, time: new Date().toISOString() });
    // One write per line, so a kill leaves at most a partial last line, which readers skip.
    fs.writeSync(this.fd, serializeEvent(event) + '\n');
    if (process.send && process.connected) process.send(event);
    for (const l of this.listeners) l(event);
    return event;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
