// Training output. On a terminal, per-iteration lines become one progress bar redrawn in place, with lasting
// lines (evaluations, checkpoints) printed above it; elsewhere (logs, pipes, CI) nanoGPT's plain lines are kept.
const redrawEveryMs = 100;

export class Progress {
  private readonly interactive: boolean;
  private readonly startedAt = performance.now();
  private startIter = -1;
  private barText = '';
  private lastDrawAt = 0;

  constructor(
    private readonly stream: Pick<NodeJS.WriteStream, 'write' | 'isTTY'>,
    private readonly lastIter: number,
  ) {
    this.interactive = Boolean(stream.isTTY);
  }

  /** A line that stays: evaluations, checkpoint saves. */
  print(line: string): void {
    if (this.interactive) this.stream.write('\r\x1b[2K');
    this.stream.write(`${line}\n`);
    if (this.interactive && this.barText) this.stream.write(this.barText);
  }

  /** A per-iteration log line; the bar shows the same on a terminal. */
  log(line: string): void {
    if (!this.interactive) this.print(line);
  }

  /** Records that iteration `iter` finished with `loss`. */
  update(iter: number, loss: number): void {
    if (!this.interactive) return;
    if (this.startIter < 0) this.startIter = iter;
    const now = performance.now();
    if (now - this.lastDrawAt < redrawEveryMs && iter < this.lastIter) return;
    this.lastDrawAt = now;
    const perSecond = ((iter - this.startIter + 1) * 1000) / (now - this.startedAt);
    const eta = formatDuration((this.lastIter - iter) / perSecond);
    const filled = Math.round((20 * iter) / Math.max(this.lastIter, 1));
    const bar = '█'.repeat(filled) + '░'.repeat(20 - filled);
    this.barText = `iter ${iter}/${this.lastIter} ${bar} ${perSecond.toFixed(2)} it/s, loss ${loss.toFixed(4)}, ETA ${eta}`;
    this.stream.write(`\r\x1b[2K${this.barText}`);
  }

  /** Leaves the final bar on its own line. */
  finish(): void {
    if (this.interactive && this.barText) this.stream.write('\n');
    this.barText = '';
  }
}

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.round(seconds);
  const hms = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
  return (hms[0] ? hms : hms.slice(1)).map((part, i) => (i ? String(part).padStart(2, '0') : String(part))).join(':');
}
