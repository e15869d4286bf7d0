// The training loop, in the order of nanoGPT's train.py. The engine does the heavy lifting (forward, backward,
// AdamW); this file decides what happens when, reports progress through `onLog`, and checkpoints.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { hasCheckpoint, loadCheckpointOptimizer, loadCheckpointWeights, readCheckpointInfo, readMetaPkl, saveCheckpoint } from './checkpoint.ts';
import { noEffectNotes, resolveConfig, trainSchema, type TrainConfig } from './config.ts';
import { BatchLoader, readMeta } from './data.ts';
import { checkDataParallel } from './distributed.ts';
import { Engine, lrAt, type Dtype, type EngineChoice, type ModelArgs } from './engine.ts';
import { explainedByEngine, firstLine, UserError } from './errors.ts';
import { gpt2Models, loadHfModel } from './pretrained.ts';
import { formatMfu, flopsPerIter, gpuName, MfuMeter, peakFlops } from './mfu.ts';
import { evalDivergence, LoopPlan, nonFiniteEvaluation, stepDivergence } from './loop.ts';
import { launchRanks } from './ranks.ts';
import { gpt2VocabSize } from './tokenizer.ts';
import type { Split } from './tokens.ts';
import { RunLog, updateRatiosByLayer } from './telemetry.ts';

export interface TrainResult {
  /** The last iteration this run reached (normally max_iters; 0 with eval_only). */
  iter_num: number;
  /** Optimizer steps taken by this run. */
  iterations: number;
  best_val_loss: number;
  /** Losses of the last evaluation of this run; null if it ran none. */
  last_eval: { train: number; val: number } | null;
  wall_time_s: number;
  out_dir: string;
  /**
   * The run was stopped through `signal`. It saved its last step unless it had taken none, or, with
   * always_save_checkpoint=False, unless that step's val loss was not below the best (whose checkpoint stays).
   */
  stopped: boolean;
}

/**
 * What a run reports, each with a line to print: `iter` at each log interval, `eval` at each evaluation, `checkpoint` at
 * each save, `stop` before the checkpoint of a run stopped through `signal` (on every rank of a data-parallel run,
 * whichever of them was asked), `info` for everything else (set-up, notes).
 */
export type TrainLogEvent =
  | { kind: 'info'; message: string }
  | { kind: 'iter'; message: string; iter: number; loss: number; time_ms: number; mfu: number | null }
  | { kind: 'eval'; message: string; iter: number; train_loss: number; val_loss: number }
  | { kind: 'checkpoint'; message: string; iter: number; out_dir: string }
  | { kind: 'stop'; message: string; iter: number };

export interface TrainOptions {
  /** Receives the run's progress; nothing is printed. */
  onLog?: (event: TrainLogEvent) => void;
  /**
   * Aborting it stops the run and saves the last step it completed (see `TrainResult.stopped`): on one process within
   * the current micro-step or evaluation batch, on several at the end of the current step.
   */
  signal?: AbortSignal;
}

export async function train(overrides: Partial<TrainConfig> = {}, options: TrainOptions = {}): Promise<TrainResult> {
  // A data-parallel run (several processes under mpirun, see distributed.ts) follows nanoGPT's DDP rules: the ranks
  // share out the gradient accumulation steps, each seeds `seed + rank`, and rank 0 alone evaluates, logs and saves.
  const { rank, worldSize } = launchRanks();
  const master = rank === 0;
  const report = (master && options.onLog) || (() => {});
  const info = (message: string) => report({ kind: 'info', message });
  const config = resolveConfig(trainSchema, overrides);
  for (const note of noEffectNotes(config, overrides)) info(note);
  checkTrainConfig(config);
  checkDataParallel(config, worldSize);
  // As nanoGPT's DDP: each rank of a GPU run trains on its own GPU, cuda:LOCAL_RANK (torchrun sets it).
  const device = worldSize > 1 && config.device === 'cuda' ? `cuda:${process.env.LOCAL_RANK ?? rank}` : config.device;
  const startedAt = performance.now();
  // A misspelt device is named before a missing dataset or a download of weights.
  Engine.checkDevice(device, config.engine as EngineChoice);

  const accumulationSteps = config.gradient_accumulation_steps / worldSize;
  const tokensPerIter = config.gradient_accumulation_steps * config.batch_size * config.block_size;
  info(`tokens per iteration will be: ${thousands(tokensPerIter)}`);
  if (master) {
    try {
      mkdirSync(config.out_dir, { recursive: true });
    } catch (err) {
      throw new UserError(`cannot create out_dir ${config.out_dir} (${firstLine(err)}); point --out_dir at a folder you can write`);
    }
  }

  const datasetDir = join(config.data_dir, config.dataset);
  const seed = config.seed + rank;
  const batches = new BatchLoader(datasetDir, config.batch_size, config.block_size, seed);
  const plan = new LoopPlan(config, accumulationSteps, lrAt);
  let runLog: RunLog | undefined;
  try {
    // --- model ---
    let iterNum = 0;
    let bestValLoss = 1e9;
    const meta = readMeta(datasetDir) ?? readMetaPkl(datasetDir);
    if (meta) info(`found vocab_size = ${meta.vocab_size} (inside ${datasetDir})`);
    let modelArgs: ModelArgs = {
      n_layer: config.n_layer,
      n_head: config.n_head,
      n_embd: config.n_embd,
      block_size: config.block_size,
      bias: config.bias,
      vocab_size: meta?.vocab_size ?? 50304,
      dropout: config.dropout,
    };
    let engine: Engine;
    if (config.init_from === 'scratch') {
      info('Initializing a new model from scratch');
      if (!meta) info('defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)');
      engine = explainedByEngine('cannot create the model', () => Engine.create(modelArgs, seed, device, config.engine as EngineChoice));
    } else if (config.init_from === 'resume') {
      info(`Resuming training from ${config.out_dir}`);
      const checkpoint = readCheckpointInfo(config.out_dir);
      // The architecture must match the saved weights; only dropout may change.
      const saved = { ...checkpoint.model_args, dropout: config.dropout };
      if (config.block_size !== saved.block_size) {
        throw new UserError(`block_size ${config.block_size} differs from the checkpoint's ${saved.block_size}, whose optimizer state holds that many positions; resume with --block_size=${saved.block_size}`);
      }
      engine = loadCheckpointWeights(config.out_dir, saved, device, config.engine as EngineChoice);
      iterNum = checkpoint.iter_num;
      bestValLoss = checkpoint.best_val_loss;
    } else {
      const source = (gpt2Models as readonly string[]).includes(config.init_from) ? 'OpenAI GPT-2' : 'Hugging Face GPT-2';
      info(`Initializing from ${source} weights: ${config.init_from}`);
      engine = await loadHfModel(config.init_from, config.dropout, device, config.engine as EngineChoice, info);
    }
    // The checkpoint records the architecture actually trained, so that it describes its own weights.
    modelArgs = engine.modelArgs();
    if (config.block_size < modelArgs.block_size) {
      engine.cropBlockSize(config.block_size);
      modelArgs = engine.modelArgs();
    } else if (config.block_size > modelArgs.block_size) {
      throw new UserError(`block_size ${config.block_size} exceeds the model's ${modelArgs.block_size} positions; use --block_size=${modelArgs.block_size} or less`);
    }
    // Token ids past the model's vocabulary would fail at the first batch, mid-run.
    const datasetVocabSize = meta?.vocab_size ?? gpt2VocabSize;
    if (datasetVocabSize > modelArgs.vocab_size) {
      throw new UserError(
        `dataset ${config.dataset} has ${datasetVocabSize} token ids but the model's vocabulary has ${modelArgs.vocab_size}; train this model on the dataset it was made for (its checkpoint's config says which), or start one with --init_from=scratch`,
      );
    }
    engine.setDropoutStream(seed, plan.microStep(iterNum, 0));
    info(`number of parameters: ${(engine.numParams(true) / 1e6).toFixed(2)}M`);
    // The CPU engines compute in float32 whatever dtype says (noEffectNotes says so where the user set it).
    if (config.device !== 'cpu') engine.setPrecision(config.dtype as Dtype);
    engine.checkMemory(config.batch_size, 'train');
    info(`engine: ${engine.build} on ${device}`);
    if (worldSize > 1) {
      engine.joinDataParallel(config.ddp_timeout);
      info(`data parallel: ${worldSize} processes, ${accumulationSteps} gradient accumulation steps each`);
      if (config.zero_stage === 1) {
        engine.setZeroStage(1);
        info(`ZeRO stage 1: each process keeps the AdamW state of 1/${worldSize} of the parameters`);
      }
    } else if (config.zero_stage === 1) {
      info('note: zero_stage=1 has no effect on one process, which keeps the whole AdamW state');
    }

    // --- optimizer ---
    const groups = engine.configureOptimizer({
      weight_decay: config.weight_decay,
      beta1: config.beta1,
      beta2: config.beta2,
      grad_clip: config.grad_clip,
    });
    info(`num decayed parameter tensors: ${groups.decay_tensors}, with ${thousands(groups.decay_params)} parameters`);
    info(`num non-decayed parameter tensors: ${groups.no_decay_tensors}, with ${thousands(groups.no_decay_params)} parameters`);
    if (config.init_from === 'resume') {
      loadCheckpointOptimizer(config.out_dir, engine);
    }

    // The engine's calls are synchronous: between them, signal handlers (Ctrl-C) get to run. One process stops
    // within the current micro-step or evaluation batch; the ranks of a data-parallel run stop together, after a step.
    const stopAsked = () => options.signal?.aborted ?? false;
    const canStopAnywhere = worldSize === 1;
    const letSignalsIn = () => new Promise((resolve) => setImmediate(resolve));
    const inEngine = <T>(action: () => T): T => explainedByEngine(`training stopped at iteration ${iterNum}`, action, outOfMemoryFix);
    const evalLoss = (split: Split, position: number) => {
      const { x, y } = batches.evaluation(split, position);
      return inEngine(() => engine.evalLoss(x, y, config.batch_size));
    };
    /** Lets signals in after each evaluation batch; a stop asked for meanwhile ends the evaluation where it may. */
    const stopBetweenBatches = (interruptible: boolean) => async () => {
      await letSignalsIn();
      return interruptible && stopAsked();
    };

    // --- training loop ---
    // As nanoGPT's estimate_mfu: the work of one rank against one device's peak.
    const stepFlops = flopsPerIter(modelArgs, engine.numParams(true), tokensPerIter / worldSize);
    const mfu = new MfuMeter(stepFlops, config.device.startsWith('cuda') ? peakFlops(gpuName() ?? '') : null);
    let runningMfu: number | null = config.device.startsWith('cuda') ? -1 : null;
    runLog = master
      ? await RunLog.open({
          outDir: config.out_dir,
          start: { init_from: config.init_from, iter: iterNum },
          wandb: config.wandb_log ? { project: config.wandb_project, runName: config.wandb_run_name, config } : undefined,
          notice: info,
        })
      : undefined;
    let savedIter: number | undefined;
    // Every rank takes part: under ZeRO-1 each sends its shard of the AdamW state to rank 0, which alone writes.
    const save = () => {
      savedIter = iterNum;
      engine.gatherOptimizerState();
      if (!master) return;
      report({ kind: 'checkpoint', message: `saving checkpoint to ${config.out_dir}`, iter: iterNum, out_dir: config.out_dir });
      try {
        saveCheckpoint(config.out_dir, engine, { model_args: modelArgs, iter_num: iterNum, best_val_loss: bestValLoss, config }, meta);
      } catch (err) {
        throw new UserError(`cannot save the checkpoint to ${config.out_dir} (${firstLine(err)}); free some space or point --out_dir elsewhere (the checkpoint already there stays loadable)`);
      }
    };
    // Weights that are no longer finite are never saved (nanoGPT's always_save_checkpoint would write them over the
    // last good checkpoint): the run stops at the first step whose gradient norm, or evaluation whose loss, is not.
    const divergenceFix = `lower --learning_rate${config.grad_clip === 0 ? ' or set --grad_clip=1.0' : ''}`;
    const diverged = (what: string) => {
      if (iterNum === firstIter) {
        return new UserError(`the weights this run starts from give ${what} at iteration ${iterNum}, its first; start from other weights`);
      }
      const kept = hasCheckpoint(config.out_dir) ? readCheckpointInfo(config.out_dir).iter_num : undefined;
      return new UserError(
        kept === undefined
          ? `training diverged at iteration ${iterNum} (${what}) and nothing was saved; ${divergenceFix} and start again`
          : `training diverged at iteration ${iterNum} (${what}); the checkpoint of iteration ${kept} in ${config.out_dir} is kept: ${divergenceFix} and resume it with --init_from=resume`,
      );
    };
    // A stopped run saves what it has, but keeps what is saved where that is better: nothing is saved before the
    // run's first step (nanoGPT never saves at iteration 0), nor weights whose loss is not finite, and with
    // always_save_checkpoint=False (the checkpoint holds the best weights so far) only weights whose val loss beats
    // the best.
    const stopAndSave = async () => {
      stopped = true;
      const taken = iterNum > firstIter;
      report({ kind: 'stop', message: taken ? `stopping after iteration ${iterNum - 1}` : 'stopping before the first iteration', iter: iterNum - 1 });
      // A stop asked for during an evaluation's save, or just after it, has these weights saved already.
      let saveNow = master && taken && savedIter !== iterNum;
      if (saveNow) {
        // Under always_save_checkpoint one val batch is enough to catch weights that the last step has just made
        // non-finite, which the next step's check would have caught had the stop not come first.
        let val: number;
        if (config.always_save_checkpoint) {
          val = evalLoss('val', plan.evalBatch(iterNum, 0));
        } else {
          val = (await plan.meanLoss('val', iterNum, evalLoss, stopBetweenBatches(false)))!;
        }
        if (!Number.isFinite(val)) {
          saveNow = false;
          info(`the weights of iteration ${iterNum - 1} give a val loss of ${val} (the run diverged): the checkpoint already in ${config.out_dir} stays; ${divergenceFix} before resuming it`);
        } else if (!config.always_save_checkpoint) {
          saveNow = val < bestValLoss;
          if (saveNow) bestValLoss = val;
          else info(`val loss ${val.toFixed(4)} is not below the best, ${bestValLoss.toFixed(4)}: the checkpoint of the best stays (always_save_checkpoint=False)`);
        }
      }
      if (engine.anyRank(saveNow)) save();
    };
    let lastEval: TrainResult['last_eval'] = null;
    let stopped = false;
    const firstIter = iterNum;
    // Each micro-step's training batch is fetched while the engine works on the one before.
    let { x, y } = batches.step(plan.microStep(iterNum, 0));
    let t0 = performance.now();
    for (;;) {
      const lr = plan.learningRate(iterNum);

      if (plan.evaluates(iterNum)) {
        // Every rank has finished the step before: a checkpoint saved now is of a step the whole run took.
        engine.barrier();
        let saveNow = false;
        let divergence: string | undefined;
        if (master) {
          const losses = await plan.estimateLoss(iterNum, evalLoss, stopBetweenBatches(canStopAnywhere));
          if (!losses) {
            await stopAndSave();
            break;
          }
          lastEval = losses;
          const message = `step ${iterNum}: train loss ${lastEval.train.toFixed(4)}, val loss ${lastEval.val.toFixed(4)}`;
          report({ kind: 'eval', message, iter: iterNum, train_loss: lastEval.train, val_loss: lastEval.val });
          runLog?.eval({ iter: iterNum, train_loss: lastEval.train, val_loss: lastEval.val, lr }, runningMfu);
          divergence = evalDivergence(lastEval);
          if (!divergence && (lastEval.val < bestValLoss || config.always_save_checkpoint)) {
            bestValLoss = lastEval.val;
            saveNow = iterNum > 0;
          }
        }
        // Rank 0 decides; every rank stops, or joins the save.
        if (engine.anyRank(divergence !== undefined)) throw diverged(divergence ?? nonFiniteEvaluation);
        if (engine.anyRank(saveNow)) save();
      }
      // As in nanoGPT, eval_only stops only a run that starts at iteration 0.
      if (iterNum === 0 && config.eval_only) break;

      // Gradients accumulate over the micro-steps, each scaled so the sum is the mean over all of them; the engine then
      // averages these sums over the ranks.
      let stopNow = false;
      for (let microStep = 0; microStep < accumulationSteps && !stopNow; microStep++) {
        // As nanoGPT's require_backward_grad_sync: the last micro-step's backward pass starts the all-reduce.
        if (worldSize > 1) engine.setBackwardGradSync(microStep === accumulationSteps - 1);
        inEngine(() => engine.accumulate(x, y, config.batch_size, 1 / accumulationSteps));
        ({ x, y } = batches.step(plan.microStep(iterNum, microStep + 1)));
        // Between micro-steps: a stop asked for during the last one comes after the step, which is then complete.
        if (canStopAnywhere && microStep < accumulationSteps - 1) {
          await letSignalsIn();
          stopNow = stopAsked();
        }
      }
      // The gradients of the micro-steps taken are dropped: the weights are still those of the last step.
      if (stopNow) {
        await stopAndSave();
        break;
      }
      const stats = inEngine(() => engine.step(lr));
      const divergence = stepDivergence(stats);
      if (divergence) throw diverged(divergence);
      runLog?.countStep(stats.clipped);

      const t1 = performance.now();
      const dt = t1 - t0;
      t0 = t1;
      if (iterNum % config.log_interval === 0) {
        // Like nanoGPT's loss.item(), the only read of the loss, so that a GPU is not waited for at every micro-step.
        const loss = engine.lastLoss();
        runningMfu = mfu.update(iterNum - firstIter, dt);
        // Like nanoGPT, the loss shown is the last micro-batch's, not the mean over the step.
        const message = `iter ${iterNum}: loss ${loss.toFixed(4)}, time ${dt.toFixed(2)}ms, mfu ${formatMfu(runningMfu)}`;
        report({ kind: 'iter', message, iter: iterNum, loss, time_ms: dt, mfu: runningMfu });
        runLog?.train({
          iter: iterNum,
          loss,
          lr,
          grad_norm: stats.grad_norm,
          clipped: stats.clipped,
          tokens_per_s: tokensPerIter / (dt / 1000),
          mfu: runningMfu,
          update_ratio: updateRatiosByLayer(stats.update_ratios),
        });
      }
      iterNum += 1;
      await letSignalsIn();
      // The ranks of a data-parallel run stop after the same step, whichever of them was asked: a rank that left
      // alone would leave the others waiting in the next all-reduce.
      if (engine.anyRank(stopAsked())) {
        // The step is applied: the checkpoint resumes at the next iteration.
        await stopAndSave();
        break;
      }
      if (iterNum > config.max_iters) break;
    }

    const iterations = iterNum - firstIter;
    return {
      iter_num: iterations > 0 ? iterNum - 1 : iterNum,
      iterations,
      best_val_loss: bestValLoss,
      last_eval: lastEval,
      wall_time_s: (performance.now() - startedAt) / 1000,
      out_dir: config.out_dir,
      stopped,
    };
  } finally {
    batches.close();
    await runLog?.close();
  }
}

const outOfMemoryFix = 'lower --batch_size, and raise --gradient_accumulation_steps to keep the tokens per iteration';

function checkTrainConfig(config: TrainConfig): void {
  const positive = ['eval_interval', 'log_interval', 'eval_iters', 'gradient_accumulation_steps', 'batch_size', 'block_size'] as const;
  for (const key of positive) {
    if (config[key] < 1) throw new UserError(`${key} must be at least 1, got ${config[key]}`);
  }
}

function thousands(n: number): string {
  return n.toLocaleString('en-US');
}
