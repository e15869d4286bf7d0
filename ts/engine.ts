// The one bridge to the Rust engine: loads the napi addon and gives its calls TypeScript types.
// Everything heavy (forward, backward, optimizer, evaluation, generation, serialisation) runs in Rust.
import { createRequire } from 'node:module';
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The architecture of a model: what a checkpoint records as `model_args`. */
export interface ModelArgs {
  n_layer: number;
  n_head: number;
  n_embd: number;
  block_size: number;
  bias: boolean;
  vocab_size: number;
  dropout: number;
  /** 'erf' (nanoGPT's nn.GELU) unless a checkpoint says otherwise; GPT-2 weights use 'tanh'. */
  gelu?: 'erf' | 'tanh';
}

export interface OptimizerArgs {
  weight_decay: number;
  beta1: number;
  beta2: number;
  /** Global-norm clipping threshold; 0 disables clipping. */
  grad_clip: number;
}

export interface LrSchedule {
  learning_rate: number;
  min_lr: number;
  warmup_iters: number;
  lr_decay_iters: number;
  decay_lr: boolean;
}

/** nanoGPT's two AdamW groups: tensors of rank >= 2 decay, the rest do not. */
export interface ParamGroups {
  decay_tensors: number;
  decay_params: number;
  no_decay_tensors: number;
  no_decay_params: number;
}

export interface StepStats {
  /** Global L2 norm of the accumulated gradients, before clipping. */
  grad_norm: number;
  clipped: boolean;
  /** ‖Δp‖/‖p‖ of this step for every parameter tensor, by name (a network-health figure). */
  update_ratios: Array<[string, number]>;
}

interface NativeGpt {
  modelArgs(): string;
  cropBlockSize(blockSize: number): void;
  numParams(nonEmbedding: boolean): number;
  configureOptimizer(optimizerArgsJson: string): string;
  loadOptimizerFile(path: string): void;
  forwardBackward(x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number): number;
  step(lr: number): string;
  evalLoss(x: Uint32Array, y: Int32Array, batchSize: number): number;
  generate(prompt: Uint32Array, maxNewTokens: number, temperature: number, topK: number, seed: number): Uint32Array;
  saveWeightsFile(path: string): void;
  saveOptimizerFile(path: string): void;
  exportHfFile(path: string): void;
  hfConfig(): string;
}

interface NativeModule {
  Gpt: {
    create(modelArgsJson: string, seed: number, device: string): NativeGpt;
    fromSafetensorsFile(modelArgsJson: string, path: string, device: string): NativeGpt;
    fromHfGpt2File(configJson: string, path: string, dropout: number, device: string): NativeGpt;
  };
  lrAt(iter: number, scheduleJson: string): number;
}

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
let native: NativeModule | undefined;

function loadNative(): NativeModule {
  if (native) return native;
  const dir = join(packageRoot, 'native');
  const file = existsSync(dir) ? readdirSync(dir).find((f) => f.endsWith('.node')) : undefined;
  if (!file) {
    throw new Error(
      `the native engine is not built (no .node file in ${dir}); run \`npm run build:native\` (needs cargo) and try again`,
    );
  }
  native = createRequire(import.meta.url)(join(dir, file)) as NativeModule;
  return native;
}

/** A GPT in the engine, with its optimizer state once `configureOptimizer` has been called. */
export class Engine {
  private constructor(private readonly gpt: NativeGpt) {}

  /** A freshly initialised model (nanoGPT's init), deterministic for a given seed. */
  static create(args: ModelArgs, seed: number, device = 'cpu'): Engine {
    return new Engine(loadNative().Gpt.create(JSON.stringify(args), seed, device));
  }

  /**
   * A model whose weights the engine reads from the safetensors file at `path` (names as nanoGPT's state dict).
   * Files are read and written by the engine, not through Node.js Buffers, which stop at 2 GB to 4 GB.
   */
  static fromSafetensorsFile(args: ModelArgs, path: string, device = 'cpu'): Engine {
    return new Engine(loadNative().Gpt.fromSafetensorsFile(JSON.stringify(args), path, device));
  }

  /**
   * A Hugging Face GPT-2 (`config.json` text, and the path of its `model.safetensors`, e.g. OpenAI's weights): the
   * architecture comes from the config, with `dropout` in place of the config's.
   */
  static fromHfGpt2File(configJson: string, path: string, dropout: number, device = 'cpu'): Engine {
    return new Engine(loadNative().Gpt.fromHfGpt2File(configJson, path, dropout, device));
  }

  /** The architecture as it is now (after any `cropBlockSize`). */
  modelArgs(): ModelArgs {
    return JSON.parse(this.gpt.modelArgs()) as ModelArgs;
  }

  /** nanoGPT's crop_block_size: keeps the first `blockSize` positions. Call it before `configureOptimizer`. */
  cropBlockSize(blockSize: number): void {
    this.gpt.cropBlockSize(blockSize);
  }

  /** nanoGPT's count: every parameter once; with `nonEmbedding`, less the position embedding. */
  numParams(nonEmbedding = true): number {
    return this.gpt.numParams(nonEmbedding);
  }

  configureOptimizer(args: OptimizerArgs): ParamGroups {
    return JSON.parse(this.gpt.configureOptimizer(JSON.stringify(args))) as ParamGroups;
  }

  /** Restores AdamW moments and step count written by `saveOptimizerFile`. */
  loadOptimizerFile(path: string): void {
    this.gpt.loadOptimizerFile(path);
  }

  /**
   * One micro-step: forward and backward on a batch of `batchSize` rows, adding
   * `lossScale` * gradient to the accumulated gradients. Returns the unscaled mean loss.
   * `y` may hold -1 for positions that do not count.
   */
  forwardBackward(x: Uint32Array, y: Int32Array, batchSize: number, lossScale = 1): number {
    return this.gpt.forwardBackward(x, y, batchSize, lossScale);
  }

  /** Clips (if configured), applies AdamW at `lr` to both groups, and clears the gradients. */
  step(lr: number): StepStats {
    return JSON.parse(this.gpt.step(lr)) as StepStats;
  }

  /** Mean loss of a batch in evaluation mode (no dropout, no gradients). */
  evalLoss(x: Uint32Array, y: Int32Array, batchSize: number): number {
    return this.gpt.evalLoss(x, y, batchSize);
  }

  /** The prompt followed by `maxNewTokens` sampled tokens (topK 0 = no top-k filter). */
  generate(prompt: Uint32Array, maxNewTokens: number, temperature: number, topK: number, seed: number): Uint32Array {
    return this.gpt.generate(prompt, maxNewTokens, temperature, topK, seed);
  }

  /** Writes the weights to a safetensors file (nanoGPT's parameter names, tied lm_head omitted). */
  saveWeightsFile(path: string): void {
    this.gpt.saveWeightsFile(path);
  }

  /** Writes the weights as a Hugging Face GPT-2 `model.safetensors` (`transformer.` names, Conv1D layout). */
  exportHfFile(path: string): void {
    this.gpt.exportHfFile(path);
  }

  /** The Hugging Face GPT-2 `config.json` text that goes with `exportHfFile`. */
  hfConfig(): string {
    return this.gpt.hfConfig();
  }

  /** Writes the AdamW state (moments and step) to a safetensors file. */
  saveOptimizerFile(path: string): void {
    this.gpt.saveOptimizerFile(path);
  }
}

/** nanoGPT's learning rate at iteration `iter`: linear warmup, cosine decay, floor at min_lr. */
export function lrAt(iter: number, schedule: LrSchedule): number {
  return loadNative().lrAt(iter, JSON.stringify(schedule));
}
