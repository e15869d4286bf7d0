// What a training run records besides its printed lines: every log and eval record appended to
// out_dir/log.jsonl (read back by `nanogpt-rs plot`), network-health figures (gradient norm, clipping,
// per-layer update/weight ratios), and the same keys sent to Weights & Biases when asked for.
import { appendFileSync, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

export interface TrainRecord {
  kind: 'train';
  iter: number;
  loss: number;
  lr: number;
  /** Global gradient norm before clipping. */
  grad_norm: number;
  clipped: boolean;
  /** Fraction of this run's steps so far whose gradients were clipped. */
  clip_fraction: number;
  tokens_per_s: number;
  /** Model FLOPs utilisation against the device's peak; null where no peak is known (CPU). */
  mfu: number | null;
  /** Largest ‖Δp‖/‖p‖ among each layer's tensors at this step: `wte`, `wpe`, `h.0` ... `h.{L-1}`, `ln_f`. */
  update_ratio: Record<string, number>;
  time: string;
}

export interface EvalRecord {
  kind: 'eval';
  iter: number;
  train_loss: number;
  val_loss: number;
  lr: number;
  time: string;
}

/** The start of a run: a resumed one continues from `iter`, where its checkpoint was saved. */
export interface RunRecord {
  kind: 'run';
  init_from: string;
  iter: number;
  time: string;
}

export type LogRecord = TrainRecord | EvalRecord | RunRecord;

export const logFileName = 'log.jsonl';

/** Groups per-tensor update ratios by layer, keeping the largest in each. */
export function updateRatiosByLayer(ratios: ReadonlyArray<readonly [string, number]>): Record<string, number> {
  const byLayer: Record<string, number> = {};
  for (const [name, ratio] of ratios) {
    const layer = name.match(/^transformer\.(h\.\d+|wte|wpe|ln_f)\./)?.[1] ?? name;
    byLayer[layer] = Math.max(byLayer[layer] ?? 0, ratio);
  }
  return byLayer;
}

/** Minimal shape of the `@wandb/sdk` default export that a run uses. */
interface Wandb {
  init(options: { project: string; name: string; config: Record<string, unknown> }): Promise<unknown>;
  log(values: Record<string, unknown>): void;
  finish(): Promise<void>;
}

export interface RunLogOptions {
  outDir: string;
  wandb?: { project: string; runName: string; config: Record<string, unknown> };
  /** How the run starts: recorded before its first record, so that `latestRun` can tell runs in one out_dir apart. */
  start: { init_from: string; iter: number };
  /** Where one-time notices go (the progress display's print). */
  notice: (line: string) => void;
}

/** Appends one JSON object per line to out_dir/log.jsonl; a resumed run continues the same file. */
export class RunLog {
  readonly path: string;
  /** Until the run's first record: a run that records nothing (stopped at once) leaves the log as it was. */
  private start: RunLogOptions['start'] | undefined;
  private steps = 0;
  private clips = 0;

  private readonly notice: (line: string) => void;

  private constructor(
    options: RunLogOptions,
    private readonly wandb: Wandb | null,
  ) {
    mkdirSync(options.outDir, { recursive: true });
    this.path = join(options.outDir, logFileName);
    this.start = options.start;
    this.notice = options.notice;
  }

  static async open(options: RunLogOptions): Promise<RunLog> {
    return new RunLog(options, options.wandb ? await connectWandb(options.wandb, options.notice) : null);
  }

  train(record: Omit<TrainRecord, 'kind' | 'clip_fraction' | 'time'>): TrainRecord {
    const full: TrainRecord = { kind: 'train', ...record, clip_fraction: this.clipFraction(), time: new Date().toISOString() };
    this.append(full);
    this.wandb?.log({
      iter: full.iter,
      // Not nanoGPT's `train/loss`, which is the evaluation's mean (below): this is the logged step's micro-batch.
      'train/iter_loss': full.loss,
      lr: full.lr,
      mfu: full.mfu === null ? undefined : full.mfu * 100,
      'health/grad_norm': full.grad_norm,
      'health/clip_fraction': full.clip_fraction,
      ...Object.fromEntries(Object.entries(full.update_ratio).map(([layer, r]) => [`health/update_ratio/${layer}`, r])),
    });
    return full;
  }

  /** Counts every optimizer step (logged or not) for the clip fraction. */
  countStep(clipped: boolean): void {
    this.steps += 1;
    if (clipped) this.clips += 1;
  }

  eval(record: Omit<EvalRecord, 'kind' | 'time'>, mfu: number | null): void {
    this.append({ kind: 'eval', ...record, time: new Date().toISOString() });
    // nanoGPT's wandb keys at each evaluation.
    this.wandb?.log({ iter: record.iter, 'train/loss': record.train_loss, 'val/loss': record.val_loss, lr: record.lr, mfu: mfu === null ? undefined : mfu * 100 });
  }

  /** Finishes the W&B run; a failure there is said, not thrown, so that it never hides how the run ended. */
  async close(): Promise<void> {
    try {
      await this.wandb?.finish();
    } catch (err) {
      this.notice(`wandb_log: cannot finish the Weights & Biases run (${err instanceof Error ? err.message : String(err)}); the run is logged to ${logFileName} in out_dir`);
    }
  }

  private clipFraction(): number {
    return this.steps === 0 ? 0 : this.clips / this.steps;
  }

  private append(record: TrainRecord | EvalRecord): void {
    const lines: LogRecord[] = this.start ? [{ kind: 'run', ...this.start, time: record.time }, record] : [record];
    this.start = undefined;
    appendFileSync(this.path, lines.map((line) => JSON.stringify(line) + '\n').join(''));
  }
}

/** Every record of a run's log; a line cut short by a crash is skipped. */
export function readRunLog(outDir: string): LogRecord[] {
  const path = join(outDir, logFileName);
  if (!existsSync(path)) return [];
  const records: LogRecord[] = [];
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    try {
      records.push(JSON.parse(line) as LogRecord);
    } catch {
      // A partial last line from an interrupted run carries nothing usable.
    }
  }
  return records;
}

/** Weights & Biases through its official JavaScript SDK, or null (said once) when it cannot be used. */
async function connectWandb(options: NonNullable<RunLogOptions['wandb']>, notice: (line: string) => void): Promise<Wandb | null> {
  if (!process.env.WANDB_API_KEY) {
    notice(`wandb_log: WANDB_API_KEY is not set, so nothing goes to Weights & Biases; the run is logged to ${logFileName} in out_dir`);
    return null;
  }
  let wandb: Wandb;
  try {
    const sdk = '@wandb/sdk';
    wandb = ((await import(sdk)) as { default: Wandb }).default;
  } catch {
    notice(`wandb_log: the @wandb/sdk package is not installed (npm install @wandb/sdk); the run is logged to ${logFileName} only`);
    return null;
  }
  try {
    await wandb.init({ project: options.project, name: options.runName, config: options.config });
    return wandb;
  } catch (err) {
    notice(`wandb_log: cannot reach Weights & Biases (${err instanceof Error ? err.message : String(err)}); the run is logged to ${logFileName} only`);
    return null;
  }
}

/**
 * The records of the latest run and the runs it resumed: those since the last run that did not resume (one from
 * scratch or from GPT-2 starts a new model), each resume replacing the records from its iteration on (the steps after
 * the checkpoint it resumed, which the run before it did not save). A log from before runs were recorded is one run.
 */
export function latestRun(records: readonly LogRecord[]): Array<TrainRecord | EvalRecord> {
  let kept: Array<TrainRecord | EvalRecord> = [];
  for (const record of records) {
    if (record.kind !== 'run') kept.push(record);
    else kept = record.init_from === 'resume' ? kept.filter((r) => r.iter < record.iter) : [];
  }
  return kept;
}
