// Training progress on the terminal: a one-line progress bar redrawn in place when stderr is a TTY, plain lines
// otherwise (logs, CI, pipes). Driven by the same events that go to events.jsonl.
import { preparingText, type PreparingMessage, type TrainerEvent } from '../protocol/events';
import { shellLine } from '../util/shellLine';

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

export function progressLine(e: Extract<TrainerEvent, { kind: 'step' }>, width = 24): string {
  const filled = Math.round((e.step / e.totalSteps) * width);
  const bar = '#'.repeat(filled) + '.'.repeat(width - filled);
  const eta = e.etaSeconds === null ? '' : ` ETA ${formatDuration(e.etaSeconds)}`;
  return `[${bar}] step ${e.step}/${e.totalSteps} loss ${e.loss.toFixed(4)} lr ${e.lr.toExponential(2)} ${Math.round(e.tokensPerSecond)} tok/s${eta}`;
}

export class TerminalProgress {
  private barShown = false;
  /** The run folder, from run-started, for the resume command a stop prints. */
  private runDir = '<run>';
  private stage: PreparingMessage['stage'] | null = null;

  constructor(private readonly out: NodeJS.WriteStream = process.stderr, private readonly tty = Boolean(process.stderr.isTTY)) {}

  private line(text: string): void {
    if (this.barShown) this.out.write('\r\x1b[2K');
    this.barShown = false;
    this.out.write(text + '\n');
  }

  /** Ends a line drawn in place (the bar, a tokenizing count), so that what is written next starts a line of its own. */
  close(): void {
    if (this.barShown) this.out.write('\n');
    this.barShown = false;
  }

  /** Before the run: the tokenizing count redrawn in place on a TTY; elsewhere a line when a stage begins. */
  preparing(p: PreparingMessage): void {
    const text = preparingText(p, '...');
    if (this.tty) {
      this.out.write('\r\x1b[2K' + text);
      this.barShown = true;
    } else if (p.stage !== this.stage) {
      this.line(p.stage === 'model' ? text : `tokenizing the data: ${(p.total ?? 0).toLocaleString('en-US')} examples...`);
    }
    this.stage = p.stage;
  }

  handle(e: TrainerEvent): void {
    switch (e.kind) {
      case 'run-started':
        this.runDir = e.runDir;
        this.line(
          `${e.resumedFrom === null ? 'training' : `resuming from step ${e.resumedFrom}`}: ${e.dataset.trainExamples} examples ` +
            `(${e.dataset.evalExamples} for eval), ${e.trainableParameters.toLocaleString('en-US')} trainable parameters, ${e.totalSteps} steps`,
        );
        break;
      case 'step':
        if (this.tty) {
          this.out.write('\r\x1b[2K' + progressLine(e));
          this.barShown = true;
        } else {
          this.line(progressLine(e).replace(/^\[[#.]+\] /, ''));
        }
        break;
      case 'eval':
        this.line(`eval at step ${e.step}: loss ${e.evalLoss === null ? 'not finite' : e.evalLoss.toFixed(4)} over ${e.evalTokens} tokens`);
        break;
      case 'sample': {
        const text = e.text.replace(/\s+/g, ' ').trim();
        this.line(`sample ${e.index + 1} at step ${e.step}: ${JSON.stringify(e.prompt)} -> ${JSON.stringify(text.length > 160 ? text.slice(0, 157) + '...' : text)}`);
        break;
      }
      case 'checkpoint':
        this.line(`checkpoint saved: ${e.path}`);
        break;
      case 'warning':
        this.line(`warning: ${e.message}`);
        break;
      case 'finished':
        this.line(
          e.status === 'completed'
            ? `finished ${e.step} steps in ${formatDuration(e.elapsedSeconds)}; adapter: ${e.adapterPath}`
            : e.status === 'stopped'
              ? `stopped at step ${e.step}; resume with "${shellLine(['qlora-studio', 'resume', '--run', this.runDir])}"${e.adapterPath ? `; adapter so far: ${e.adapterPath}` : ''}`
              : `failed at step ${e.step}`,
        );
        break;
      default:
        break;
    }
  }
}
