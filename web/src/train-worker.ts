// The training worker: the engine (the WebAssembly build, with its thread pool on nested workers where the page
// is cross-origin isolated) and nanoGPT's training loop, in the order of ts/train.ts, so the page never blocks.
import { checkpointFiles, checkpointInfoText, parseCheckpointInfo, type CheckpointInfo } from '../../ts/checkpoint-info.ts';
import type { LrSchedule, MemoryEstimate, ModelArgs, OptimizerArgs, ParamGroups, StepStats } from '../../ts/engine-types.ts';
import { firstLine } from '../../ts/errors.ts';
import { evalDivergence, LoopPlan, stepDivergence } from '../../ts/loop.ts';
import { defaultsOf, trainKeys, type TrainConfig } from '../../ts/schema.ts';
import { batchRng, CharTokenizer, encodeCharDataset, sampleBatch, type BatchUse, type Meta, type Split } from '../../ts/tokens.ts';
import { pickWasmBuild } from '../../ts/wasm-build.ts';
import { wasmMemoryRefusal } from '../../ts/wasm-memory.ts';
import type { FromWorker, ToWorker } from './messages.ts';
import type { ZipEntry } from './zip.ts';

/** The browser build of the engine (wasm/web/nanogpt.js), as this worker uses it. */
interface EngineGlue {
  default(options: { module_or_path: WebAssembly.Module }): Promise<{ memory: WebAssembly.Memory }>;
  startThreads?(count: number): void;
  lrAt(iter: number, schedule: LrSchedule): number;
  estimateMemory(modelArgs: ModelArgs, batchSize: number, training: boolean): MemoryEstimate;
  Gpt: {
    create(modelArgs: ModelArgs, seed: number): Gpt;
    fromSafetensors(modelArgs: ModelArgs, bytes: Uint8Array): Gpt;
  };
}

interface Gpt {
  numParams(nonEmbedding: boolean): number;
  configureOptimizer(optimizerArgs: OptimizerArgs): ParamGroups;
  loadOptimizer(bytes: Uint8Array): void;
  forwardBackward(x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number): number;
  setDropoutStream(seed: number, microStep: number): void;
  step(lr: number): StepStats;
  evalLoss(x: Uint32Array, y: Int32Array, batchSize: number): number;
  generate(prompt: Uint32Array, maxNewTokens: number, temperature: number, topK: number, seed: number): Uint32Array;
  saveWeights(): Uint8Array;
  saveOptimizer(): Uint8Array;
  free(): void;
}

const glueUrl = '/wasm/web/nanogpt.js';
const sampleKeys = { temperature: 0.8, top_k: 200 };

let engine: EngineGlue;
let dataset: { name: string; tokenizer: CharTokenizer; splits: Record<Split, Uint16Array> } | undefined;
/** The model being trained (or loaded), and where its run stands; `diverged`: why its weights are no longer finite. */
let run:
  | { gpt: Gpt; config: TrainConfig; modelArgs: ModelArgs; tokenizer: CharTokenizer; iter: number; bestValLoss: number; diverged?: string }
  | undefined;
let stopRequested = false;

const post = (message: FromWorker, transfer: Transferable[] = []) => self.postMessage(message, { transfer });

/** Problems are messages for the page, one line each, naming the fix. */
class PageError extends Error {}

self.onmessage = async ({ data }: MessageEvent<ToWorker>) => {
  try {
    switch (data.kind) {
      case 'engine':
        return post({ kind: 'engine', ...(await loadEngine(data.threads)) });
      case 'data':
        return prepare(data.name, data.text, data.blockSize);
      case 'train':
        return await train(data.config, data.fresh);
      case 'stop':
        stopRequested = true;
        return;
      case 'sample':
        return post({ kind: 'sample', iter: run?.iter ?? 0, text: sample(data.prompt, data.maxNewTokens, data.seed) });
      case 'checkpoint':
        return postCheckpoint();
      case 'load':
        return load(data.files);
    }
  } catch (err) {
    post({ kind: 'error', message: firstLine(err) });
  }
};

/**
 * Instantiates the engine (the relaxed-SIMD build where the browser has relaxed SIMD), and its thread pool when
 * asked for more than one thread.
 */
async function loadEngine(threads: number): Promise<{ threads: number; build: string }> {
  engine = (await import(glueUrl)) as EngineGlue;
  const build = pickWasmBuild();
  const module = await WebAssembly.compileStreaming(fetch(`/wasm/${build.file}`));
  const { memory } = await engine.default({ module_or_path: module });
  if (threads < 2 || !engine.startThreads) return { threads: 1, build: build.name };
  // The pool's threads: nested workers on the same module and memory, each ready before the pool starts.
  const pool = await Promise.all(
    Array.from({ length: threads }, () => {
      const worker = new Worker('/app/thread-worker.js', { type: 'module' });
      worker.postMessage({ glue: glueUrl, module, memory });
      return new Promise<Worker>((resolve, reject) => {
        worker.onmessage = () => resolve(worker);
        worker.onerror = (event) => reject(new Error(`an engine thread failed to start: ${event.message}`));
      });
    }),
  );
  // The engine asks for each of its pool threads through this hook while `startThreads` runs.
  (globalThis as { nanogptSpawnThread?: (thread: number) => void }).nanogptSpawnThread = (thread) => pool.pop()!.postMessage({ thread });
  engine.startThreads(threads);
  return { threads, build: build.name };
}

function prepare(name: string, text: string, blockSize: number): void {
  const { tokenizer, train, val } = encodeCharDataset(text);
  checkSize(val.length, blockSize);
  dataset = { name, tokenizer, splits: { train, val } };
  post({ kind: 'dataset', name, trainTokens: train.length, valTokens: val.length, vocabSize: tokenizer.vocabSize });
}

/** Both splits must hold more than one window of block_size + 1 tokens; the validation split is the smaller. */
function checkSize(valTokens: number, blockSize: number): void {
  if (valTokens > blockSize) return;
  throw new PageError(
    `the text is too small for block_size ${blockSize}: its last 10% (the validation split) holds ${valTokens} characters and needs more than ${blockSize}; use a text of at least ${10 * (blockSize + 1)} characters, or lower block_size`,
  );
}

function optimizerArgs(config: TrainConfig): OptimizerArgs {
  return { weight_decay: config.weight_decay, beta1: config.beta1, beta2: config.beta2, grad_clip: config.grad_clip };
}

/** A new model for `config` on the current dataset, refused before it exists when it cannot fit in 4 GiB. */
function startRun(config: TrainConfig): void {
  if (!dataset) throw new PageError('no dataset yet: wait for the text to load, or drop a text file');
  const modelArgs: ModelArgs = {
    n_layer: config.n_layer,
    n_head: config.n_head,
    n_embd: config.n_embd,
    block_size: config.block_size,
    bias: config.bias,
    vocab_size: dataset.tokenizer.vocabSize,
    dropout: config.dropout,
  };
  const need = engine.estimateMemory(modelArgs, config.batch_size, true);
  const refusal = wasmMemoryRefusal(need, 'train', config.batch_size, config.block_size);
  if (refusal) throw new PageError(refusal);
  run?.gpt.free();
  const gpt = engine.Gpt.create(modelArgs, config.seed);
  gpt.configureOptimizer(optimizerArgs(config));
  run = { gpt, config, modelArgs, tokenizer: dataset.tokenizer, iter: 0, bestValLoss: 1e9 };
  post({ kind: 'model', params: gpt.numParams(true), memoryBytes: need.total, iter: 0 });
}

/** Yields to the event loop (so that a stop message gets in) without a timer's clamped delay. */
const channel = new MessageChannel();
const yieldToEvents = () =>
  new Promise<void>((resolve) => {
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });

async function train(requested: TrainConfig, fresh: boolean): Promise<void> {
  if (fresh || !run) startRun(requested);
  const current = run!;
  if (current.diverged) throw new PageError(current.diverged);
  if (!dataset || dataset.tokenizer.characters !== current.tokenizer.characters) {
    throw new PageError("this model's vocabulary is not the dataset's: load the text it was trained on (drop it), or start a new run");
  }
  checkSize(dataset.splits.val.length, current.modelArgs.block_size);
  // A run continues with the page's iteration count and schedule; the architecture stays the model's.
  const config: TrainConfig = { ...requested, ...pick(current.modelArgs, ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias']) };
  current.config = config;
  const { gpt } = current;
  const { splits } = dataset;
  const T = config.block_size;
  const batch = (split: Split, use: BatchUse, position: number) =>
    sampleBatch(splits[split].length, config.batch_size, T, batchRng(config.seed, split, use, position), (offset) => splits[split].subarray(offset, offset + T + 1));
  const plan = new LoopPlan(config, config.gradient_accumulation_steps, engine.lrAt);
  gpt.setDropoutStream(config.seed, plan.microStep(current.iter, 0));
  const evalLoss = (split: Split, position: number) => {
    const { x, y } = batch(split, 'eval', position);
    return gpt.evalLoss(x, y, config.batch_size);
  };
  const tokensPerIter = plan.accumulationSteps * config.batch_size * T;
  const firstIter = current.iter;
  const startedAt = performance.now();
  // As the CLI's runs, training stops at the first step or evaluation that is not finite; the weights it leaves are
  // neither trained on, sampled from, nor downloaded.
  const diverged = (iter: number, what: string) => {
    current.diverged =
      iter === firstIter
        ? `the weights this run starts from give ${what} at iteration ${iter}; start a New run, or load other weights`
        : `training diverged at iteration ${iter} (${what}): lower learning_rate and start a New run`;
    return new PageError(current.diverged);
  };

  stopRequested = false;
  const stopAsked = async () => {
    await yieldToEvents();
    return stopRequested;
  };
  while (current.iter <= config.max_iters && !stopRequested) {
    const iter = current.iter;
    const lr = plan.learningRate(iter);
    if (plan.evaluates(iter)) {
      const losses = await plan.estimateLoss(iter, evalLoss, stopAsked);
      if (!losses) break;
      post({ kind: 'eval', iter, ...losses });
      const divergence = evalDivergence(losses);
      if (divergence) throw diverged(iter, divergence);
      current.bestValLoss = Math.min(current.bestValLoss, losses.val);
      if (iter > 0) post({ kind: 'sample', iter, text: sample('\n', 200, iter) });
    }
    const t0 = performance.now();
    let loss = 0;
    for (let microStep = 0; microStep < plan.accumulationSteps; microStep++) {
      const { x, y } = batch('train', 'step', plan.microStep(iter, microStep));
      loss = gpt.forwardBackward(x, y, config.batch_size, 1 / plan.accumulationSteps);
    }
    const stats = gpt.step(lr);
    const divergence = stepDivergence(stats);
    if (divergence) throw diverged(iter, divergence);
    const stepMs = performance.now() - t0;
    current.iter += 1;
    const perIter = (performance.now() - startedAt) / (current.iter - firstIter);
    post({
      kind: 'iter',
      iter,
      loss,
      lr,
      stepMs,
      tokensPerSecond: tokensPerIter / (stepMs / 1000),
      etaSeconds: ((config.max_iters + 1 - current.iter) * perIter) / 1000,
    });
    await yieldToEvents();
  }
  post({ kind: 'stopped', iter: current.iter, finished: current.iter > config.max_iters });
}

function pick<T extends object, K extends keyof T>(from: T, keys: K[]): Pick<T, K> {
  return Object.fromEntries(keys.map((key) => [key, from[key]])) as Pick<T, K>;
}

function sample(prompt: string, maxNewTokens: number, seed: number): string {
  if (!run) throw new PageError('no model yet: train one, or load a checkpoint');
  if (run.diverged) throw new PageError(run.diverged);
  const ids = run.tokenizer.encode(prompt);
  if (ids.length === 0) throw new PageError('the prompt is empty; type some text to start from');
  return run.tokenizer.decode(run.gpt.generate(Uint32Array.from(ids), maxNewTokens, sampleKeys.temperature, sampleKeys.top_k, seed));
}

/** The folder the CLI writes (ckpt.json as checkpoint.ts writes it), plus the vocabulary `sample` reads from it. */
function postCheckpoint(): void {
  if (!run) throw new PageError('no model yet: train one first');
  if (run.diverged) throw new PageError(run.diverged);
  const info: CheckpointInfo = { model_args: run.modelArgs, iter_num: run.iter, best_val_loss: run.bestValLoss, config: run.config };
  const encoder = new TextEncoder();
  const files: ZipEntry[] = [
    { name: checkpointFiles.weights, bytes: run.gpt.saveWeights() },
    { name: checkpointFiles.optimizer, bytes: run.gpt.saveOptimizer() },
    { name: checkpointFiles.info, bytes: encoder.encode(checkpointInfoText(info)) },
    { name: 'meta.json', bytes: encoder.encode(JSON.stringify(run.tokenizer.toMeta())) },
  ];
  post({ kind: 'checkpoint', folder: run.config.out_dir, files }, files.map((file) => file.bytes.buffer as ArrayBuffer));
}

/** A checkpoint folder from the CLI or this page: to sample from, or to resume training on the same text. */
function load(files: ZipEntry[]): void {
  const byName = new Map(files.map((file) => [file.name.split('/').pop()!, file.bytes]));
  const text = (name: string) => new TextDecoder().decode(byName.get(name));
  if (!byName.has(checkpointFiles.info) || !byName.has(checkpointFiles.weights)) {
    throw new PageError(`a checkpoint needs ${checkpointFiles.info} and ${checkpointFiles.weights} (and ${checkpointFiles.optimizer} to resume); pick the files of its out_dir, or its zip`);
  }
  const info = parseCheckpointInfo(text(checkpointFiles.info), checkpointFiles.info);
  const vocabulary = byName.has('meta.json') ? CharTokenizer.fromMeta(JSON.parse(text('meta.json')) as Meta) : dataset && dataset.name === info.config.dataset ? dataset.tokenizer : undefined;
  if (!vocabulary || vocabulary.vocabSize !== info.model_args.vocab_size) {
    throw new PageError(`the checkpoint's ${info.model_args.vocab_size}-character vocabulary is not here: add its dataset's meta.json (${String(info.config.dataset)}/meta.json under data_dir) to the files`);
  }
  const saved = Object.entries(info.config).filter(([key]) => Object.hasOwn(trainKeys, key));
  const config = { ...defaultsOf(trainKeys), ...Object.fromEntries(saved) } as TrainConfig;
  const modelArgs = { ...info.model_args, dropout: config.dropout };
  run?.gpt.free();
  const gpt = engine.Gpt.fromSafetensors(modelArgs, byName.get(checkpointFiles.weights)!);
  gpt.configureOptimizer(optimizerArgs(config));
  const optimizer = byName.get(checkpointFiles.optimizer);
  if (optimizer) gpt.loadOptimizer(optimizer);
  run = { gpt, config, modelArgs, tokenizer: vocabulary, iter: info.iter_num, bestValLoss: info.best_val_loss };
  post({ kind: 'loaded', info, optimizer: optimizer !== undefined });
  post({ kind: 'model', params: gpt.numParams(true), memoryBytes: 0, iter: info.iter_num });
}
