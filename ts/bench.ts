// `nanogpt-rs bench`: nanoGPT's bench.py. Times training steps of a fixed shape (GPT-2 124M, B=12, T=1024 by
// default) on random or real tokens: burn-in steps, then timed steps; reports ms/iter, tokens/s, MFU against the
// running GPU's peak, and peak device memory. The engine does all the work; this file only drives and times it.
import { join } from 'node:path';
import { BatchLoader, type Batch } from './data.ts';
import { benchDefaults, noEffectNotes, type BenchOptions } from './config.ts';
import { Engine, engineChoices, resolveEngine, type Dtype, type EngineChoice, type ModelArgs, type PhaseTimes } from './engine.ts';
import { explainedByEngine, UserError } from './errors.ts';
import { flopsPerIter, gpuName, peakFlops } from './mfu.ts';
import { Rng } from './rng.ts';

/** What bench needs of an engine (an `Engine`, or a stand-in in tests). */
export type BenchEngine = Pick<
  Engine,
  'numParams' | 'configureOptimizer' | 'forwardBackward' | 'step' | 'setPrecision' | 'synchronize' | 'memoryStats' | 'setProfiling' | 'phaseTimes'
>;


export interface BenchResult {
  device: string;
  gpu: string | null;
  dtype: string;
  n_params: number;
  batch_size: number;
  block_size: number;
  ms_per_iter: number;
  tokens_per_s: number;
  tflops: number;
  /** Against the running GPU's bf16 peak (null on a CPU or an unknown GPU). */
  mfu: number | null;
  warmup_s: number;
  loss: number;
  peak_mem_bytes: number | null;
  /** Mean phase times over the timed steps, with `profile`; data_ms includes reading real batches. */
  phases: PhaseTimes | null;
}

export type CreateBenchEngine = (args: ModelArgs, seed: number, device: string, engine: EngineChoice) => BenchEngine;

/** Runs the benchmark; `log` receives bench.py's progress lines. */
export function runBench(
  options: Partial<BenchOptions> = {},
  createEngine: CreateBenchEngine = Engine.create,
  log: (line: string) => void = console.log,
): BenchResult {
  const o = { ...benchDefaults, ...options };
  for (const key of ['batch_size', 'block_size', 'iters'] as const) {
    if (!Number.isInteger(o[key]) || o[key] < 1) throw new UserError(`${key} must be a positive integer, got ${o[key]}`);
  }
  const args: ModelArgs = {
    n_layer: o.n_layer,
    n_head: o.n_head,
    n_embd: o.n_embd,
    block_size: o.block_size,
    vocab_size: o.vocab_size,
    bias: o.bias,
    dropout: 0,
  };
  Engine.checkMemory(args, o.batch_size, 'bench', resolveEngine(o.device, o.engine));
  const engine = explainedByEngine('cannot create the model', () => createEngine(args, o.seed, o.device, o.engine));
  // The CPU engines compute in float32 whatever dtype says, as in train (bench.py's default is bfloat16).
  const dtype = o.device === 'cpu' ? 'float32' : o.dtype;
  for (const note of noEffectNotes({ ...o, compile: false }, options)) log(note);
  if (o.device !== 'cpu') explainedByEngine(`cannot compute in ${o.dtype}`, () => engine.setPrecision(o.dtype));
  // bench.py's optimizer: AdamW(lr 1e-4, weight decay 1e-2, betas 0.9/0.95), no clipping, no schedule.
  engine.configureOptimizer({ weight_decay: 1e-2, beta1: 0.9, beta2: 0.95, grad_clip: 0 });
  const lr = 1e-4;
  const tokens = o.batch_size * o.block_size;

  const nextBatch = batchSource(o);
  const sync = () => engine.synchronize();
  let loss = NaN;
  let dataMs = 0;
  const phases: PhaseTimes = { data_ms: 0, forward_ms: 0, backward_ms: 0, optimizer_ms: 0 };
  const oneStep = (timed: boolean) => {
    const t = performance.now();
    const { x, y } = nextBatch();
    dataMs += performance.now() - t;
    loss = engine.forwardBackward(x, y, o.batch_size, 1);
    engine.step(lr);
    const p = timed ? engine.phaseTimes() : null;
    if (p) for (const k of Object.keys(phases) as Array<keyof PhaseTimes>) phases[k] += p[k];
  };

  let t0 = performance.now();
  for (let i = 0; i < o.warmup; i++) {
    oneStep(false);
    log(`${i + 1}/${o.warmup} loss: ${loss.toFixed(4)}`);
  }
  sync();
  const warmupS = (performance.now() - t0) / 1000;

  if (o.profile) explainedByEngine('cannot profile', () => engine.setProfiling(true));
  dataMs = 0;
  t0 = performance.now();
  for (let i = 0; i < o.iters; i++) oneStep(true);
  sync();
  const dt = (performance.now() - t0) / 1000 / o.iters;
  if (o.profile) engine.setProfiling(false);

  const nParams = engine.numParams(true);
  const flops = flopsPerIter(args, nParams, tokens);
  const gpu = o.device.startsWith('cuda') ? gpuName() : null;
  const peak = gpu ? peakFlops(gpu) : null;
  const memory = engine.memoryStats();
  const result: BenchResult = {
    device: o.device,
    gpu,
    dtype,
    n_params: nParams,
    batch_size: o.batch_size,
    block_size: o.block_size,
    ms_per_iter: round(dt * 1e3, 3),
    tokens_per_s: Math.round(tokens / dt),
    tflops: round(flops / dt / 1e12, 2),
    mfu: peak === null ? null : round(flops / dt / peak, 4),
    warmup_s: round(warmupS, 2),
    loss,
    peak_mem_bytes: memory ? memory.peak_bytes : null,
    phases: o.profile
      ? {
          data_ms: round((phases.data_ms + dataMs) / o.iters, 3),
          forward_ms: round(phases.forward_ms / o.iters, 3),
          backward_ms: round(phases.backward_ms / o.iters, 3),
          optimizer_ms: round(phases.optimizer_ms / o.iters, 3),
        }
      : null,
  };
  const mfu = result.mfu === null ? 'n/a' : `${(result.mfu * 100).toFixed(2)}%`;
  log(`time per iteration: ${(dt * 1e3).toFixed(4)}ms, MFU: ${mfu}${gpu ? ` (of ${gpu}'s peak)` : ''}`);
  log(`${result.tokens_per_s.toLocaleString('en-US')} tokens/s, ${result.tflops} TFLOP/s`);
  if (memory) log(`peak memory: ${(memory.peak_bytes / 2 ** 30).toFixed(2)} GiB allocated, device ${((memory.total_bytes - memory.free_bytes) / 2 ** 30).toFixed(2)} of ${(memory.total_bytes / 2 ** 30).toFixed(2)} GiB in use`);
  if (result.phases) {
    const p = result.phases;
    log(`per step: data ${p.data_ms} ms, forward ${p.forward_ms} ms, backward ${p.backward_ms} ms, optimizer ${p.optimizer_ms} ms`);
  }
  return result;
}

/**
 * `--key=value` arguments (nanoGPT's configurator style), the keys given only (runBench puts them over the
 * defaults, and says what a key set to no effect does); `--real_data` alone means true.
 */
export function parseBenchArgs(argv: string[]): Partial<BenchOptions> {
  const options: Record<string, string | number | boolean> = {};
  for (const arg of argv) {
    const match = /^--([a-z_0-9]+)(?:=(.*))?$/.exec(arg);
    if (!match || !Object.hasOwn(benchDefaults, match[1])) {
      throw new UserError(`unknown bench argument '${arg}'; keys: ${Object.keys(benchDefaults).join(', ')}`);
    }
    const [, key, text = 'true'] = match;
    const kind = typeof benchDefaults[key as keyof BenchOptions];
    if (kind === 'number') {
      const n = Number(text);
      if (!Number.isFinite(n)) throw new UserError(`--${key} expects a number, got '${text}'`);
      options[key] = n;
    } else if (kind === 'boolean') {
      if (!['true', 'false', 'True', 'False', '1', '0'].includes(text)) throw new UserError(`--${key} expects true or false, got '${text}'`);
      options[key] = ['true', 'True', '1'].includes(text);
    } else {
      options[key] = text;
    }
  }
  if (options.dtype !== undefined && !['float32', 'bfloat16', 'float16'].includes(options.dtype as string)) {
    throw new UserError(`--dtype must be float32, bfloat16 or float16, got '${options.dtype}'`);
  }
  if (options.engine !== undefined && !(engineChoices as readonly string[]).includes(options.engine as string)) {
    throw new UserError(`--engine must be one of ${engineChoices.join(', ')}, got '${options.engine}'`);
  }
  return options as Partial<BenchOptions>;
}

/** bench.py's data: one fixed random batch reused forever, or random windows of data/<dataset>/train.bin. */
function batchSource(o: BenchOptions): () => Batch {
  if (o.real_data) {
    const loader = new BatchLoader(join(o.data_dir, o.dataset), o.batch_size, o.block_size, o.seed);
    let position = 0;
    return () => loader.step(position++);
  }
  const rng = new Rng(o.seed);
  const n = o.batch_size * o.block_size;
  const x = Uint32Array.from({ length: n }, () => rng.nextInt(o.vocab_size));
  const y = Int32Array.from({ length: n }, () => rng.nextInt(o.vocab_size));
  return () => ({ x, y });
}

function round(value: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}
