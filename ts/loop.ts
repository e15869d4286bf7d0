// The rules of nanoGPT's training loop that the CLI's runs (train.ts) and the browser page's
// (web/src/train-worker.ts) share: what each iteration's learning rate is, when it evaluates, which batches and
// dropout masks it uses, and when a run has diverged. Kept once, so that a checkpoint moved between the two (one
// process on the cpu, the same settings) trains on as one run would. No Node.js here: the page imports it.
import type { LrSchedule, StepStats } from './engine-types.ts';
import type { TrainConfig } from './schema.ts';
import type { Split } from './tokens.ts';

type LoopKeys = Pick<TrainConfig, 'eval_interval' | 'eval_iters' | 'learning_rate' | 'min_lr' | 'warmup_iters' | 'lr_decay_iters' | 'decay_lr'>;

export class LoopPlan {
  private readonly schedule: LrSchedule;

  constructor(
    private readonly config: LoopKeys,
    /** Micro-steps an iteration takes in this process (a data-parallel run's ranks share out a step's). */
    readonly accumulationSteps: number,
    /** nanoGPT's get_lr, from the engine. */
    private readonly lrAt: (iter: number, schedule: LrSchedule) => number,
  ) {
    const { learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_lr } = config;
    this.schedule = { learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_lr };
  }

  learningRate(iter: number): number {
    return this.config.decay_lr ? this.lrAt(iter, this.schedule) : this.config.learning_rate;
  }

  /** Iterations that evaluate (and may checkpoint) before they train. */
  evaluates(iter: number): boolean {
    return iter % this.config.eval_interval === 0;
  }

  /**
   * The run's count of micro-steps at micro-step `microStep` of iteration `iter`: the position of its training batch
   * and of its dropout masks. Batches and masks are functions of the seed and this position (not of one stream, as
   * in nanoGPT), so a resumed run trains on what the run it resumes would have trained on next.
   */
  microStep(iter: number, microStep: number): number {
    return iter * this.accumulationSteps + microStep;
  }

  /** The position of evaluation batch `k` of iteration `iter`. */
  evalBatch(iter: number, k: number): number {
    return iter * this.config.eval_iters + k;
  }

  /**
   * The mean loss of `split` at iteration `iter` over eval_iters batches, `lossOf` giving the loss of the batch at a
   * position; undefined where `stop`, asked after each batch, says to stop.
   */
  async meanLoss(split: Split, iter: number, lossOf: (split: Split, position: number) => number, stop?: () => Promise<boolean>): Promise<number | undefined> {
    let sum = 0;
    for (let k = 0; k < this.config.eval_iters; k++) {
      sum += lossOf(split, this.evalBatch(iter, k));
      if (stop && (await stop())) return undefined;
    }
    return sum / this.config.eval_iters;
  }

  /** nanoGPT's estimate_loss: both splits' mean losses, or undefined where `stop` says to stop (see `meanLoss`). */
  async estimateLoss(iter: number, lossOf: (split: Split, position: number) => number, stop?: () => Promise<boolean>): Promise<{ train: number; val: number } | undefined> {
    const train = await this.meanLoss('train', iter, lossOf, stop);
    const val = train === undefined ? undefined : await this.meanLoss('val', iter, lossOf, stop);
    return train === undefined || val === undefined ? undefined : { train, val };
  }
}

/**
 * What makes a run diverged at a step, or undefined: a gradient norm that is not finite. float16's loss scaling
 * skips a step whose gradients overflow, as GradScaler does, and goes on.
 */
export function stepDivergence(stats: StepStats): string | undefined {
  return !stats.skipped && !Number.isFinite(stats.grad_norm) ? `a gradient norm of ${stats.grad_norm}` : undefined;
}

/** What makes a run diverged at an evaluation, or undefined: a loss that is not finite. */
export function evalDivergence(losses: { train: number; val: number }): string | undefined {
  return Number.isFinite(losses.train) && Number.isFinite(losses.val) ? undefined : nonFiniteEvaluation;
}

export const nonFiniteEvaluation = 'an evaluated loss that is not finite';
