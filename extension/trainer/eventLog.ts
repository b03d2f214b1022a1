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
    const file = path.join(runDir, 'events.jsonl');
    dropPartialLastLine(file);
    this.fd = fs.openSync(file, 'a');
  }

  onEvent(listener: (e: TrainerEvent) => void): void {
    this.listeners.push(listener);
  }

  emit(partial: NewEvent): TrainerEvent {
    // What is checked is the line as written (a non-finite number becomes null there), so that every line this
    // writes reads back: an event that would not is a bug here, not a log that no reader can open.
    const line = serializeEvent({ ...partial, time: new Date().toISOString() } as TrainerEvent);
    const event = validateEvent(JSON.parse(line));
    // One line at a time, so a kill (or a full disk) leaves at most a partial last line, which readers skip and the
    // next trainer on the folder cuts off. A write may take less than the whole line (a disk filling up): the rest
    // follows, or the next write throws.
    const bytes = Buffer.from(line + '\n', 'utf8');
    for (let done = 0; done < bytes.length; ) done += fs.writeSync(this.fd, bytes, done, bytes.length - done);
    sendToHost(event);
    for (const l of this.listeners) l(event);
    return event;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

/**
 * Cuts a partial last line (a kill or a full disk in the middle of a write) off the log, so that the next event starts
 * a line of its own: appended to the fragment, it would make a line no reader can parse in the middle of the file.
 */
export function dropPartialLastLine(file: string): void {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return; // no log yet
  }
  let size: number;
  let keep: number;
  try {
    size = fs.fstatSync(fd).size;
    keep = size;
    const chunk = Buffer.alloc(64 * 1024);
    // from the end backwards to the last newline (the end itself when the file ends with one)
    for (let end = size; end > 0; ) {
      const start = Math.max(0, end - chunk.length);
      fs.readSync(fd, chunk, 0, end - start, start);
      const at = chunk.subarray(0, end - start).lastIndexOf(0x0a);
      if (at >= 0) {
        keep = start + at + 1;
        break;
      }
      end = start;
      keep = 0;
    }
  } finally {
    fs.closeSync(fd);
  }
  if (keep < size) fs.truncateSync(file, keep);
}
