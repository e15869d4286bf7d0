// The one bridge to the Rust engine: loads one of its two builds (the WebAssembly module, or the napi addon) and
// gives their calls TypeScript types.
// Everything heavy (forward, backward, optimizer, evaluation, generation, serialisation) runs in Rust.
import { createRequire } from 'node:module';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { Worker } from 'node:worker_threads';
import { firstLine, UserError } from './errors.ts';
import { launchPlacement, launchRanks, localWorldSize, type Ranks } from './ranks.ts';
import { hasRelaxedSimd, pickWasmBuild, wasmBuilds, type WasmBuild, type WasmBuildChoice } from './wasm-build.ts';
import { wasmMemoryLimit, wasmMemoryRefusal, type MemoryPurpose } from './wasm-memory.ts';

import type {
  CheckpointInfo,
  LrSchedule,
  MemoryEstimate,
  MemoryStats,
  ModelArgs,
  OptimizerArgs,
  ParamGroups,
  PhaseTimes,
  StepStats,
} from './engine-types.ts';

// The engine's own types, generated from its Rust structs (`npm run gen:types`).
export type * from './engine-types.ts';

/** The compute precisions of nanoGPT's `dtype` key. */
export type Dtype = 'float32' | 'bfloat16' | 'float16';

/** Which build of the Rust engine runs a model: the WebAssembly one (CPU, portable) or the napi addon. */
export type EngineKind = 'wasm' | 'native';
/** `auto` picks wasm for the cpu device and the native addon otherwise. */
export type EngineChoice = 'auto' | EngineKind;
export { engineChoices } from './schema.ts';

/**
 * One model inside a binding. Both bindings are driven through this shape; files are named by path. The engine's
 * structs cross as plain objects.
 */
interface BindingGpt {
  modelArgs(): ModelArgs;
  cropBlockSize(blockSize: number): void;
  numParams(nonEmbedding: boolean): number;
  configureOptimizer(optimizerArgs: OptimizerArgs): ParamGroups;
  loadOptimizerFile(path: string): void;
  forwardBackward(x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number): number;
  accumulate(x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number): void;
  lastLoss(): number;
  setDropoutStream(seed: number, microStep: number): void;
  step(lr: number): StepStats;
  evalLoss(x: Uint32Array, y: Int32Array, batchSize: number): number;
  generate(prompt: Uint32Array, maxNewTokens: number, temperature: number, topK: number, seed: number): Uint32Array;
  generateBatch(prompt: Uint32Array, seeds: Uint32Array, maxNewTokens: number, temperature: number, topK: number): Uint32Array;
  startSampling(prompt: Uint32Array, seeds: Uint32Array, temperature: number, topK: number): void;
  nextTokens(): Uint32Array;
  saveWeightsFile(path: string): void;
  saveOptimizerFile(path: string): void;
  saveGradientsFile(path: string): void;
  exportHfFile(path: string): void;
  loadNanogptOptimizerFile(path: string): void;
  saveNanogptCheckpointFile(path: string, info: CheckpointInfo): void;
  hfConfig(): string;
  setPrecision(dtype: string): void;
  synchronize(): void;
  memoryStats(): MemoryStats | null;
  setProfiling(on: boolean): void;
  phaseTimes(): PhaseTimes | null;
  /** The addon only: joins the ranks mpirun started (an MPI build), returning [rank, world size]. */
  joinMpi?(timeoutSeconds: number): number[];
  /** The addon only (the CUDA build with NCCL; others refuse): joins the GPU ranks torchrun started, returning [rank, world size]. */
  joinNccl?(masterAddr: string, masterPort: number, rank: number, worldSize: number, rendezvousTimeoutSeconds: number, timeoutSeconds: number): number[];
  barrier?(): void;
  anyRank?(flag: boolean): boolean;
  setBackwardGradSync?(sync: boolean): void;
  setZeroStage?(stage: number): void;
  gatherOptimizerState?(): void;
}

interface Binding {
  kind: EngineKind;
  /** The build, as engine info and benchmark output name it: 'native', 'cuda', 'cuda-nccl', 'wasm (relaxed-simd)', 'wasm (simd128)'. */
  build: string;
  create(modelArgs: ModelArgs, seed: number, device: string): BindingGpt;
  fromSafetensorsFile(modelArgs: ModelArgs, path: string, device: string): BindingGpt;
  fromHfGpt2File(configJson: string, path: string, dropout: number, device: string): BindingGpt;
  fromNanogptCheckpointFile(modelArgs: ModelArgs, path: string, device: string): BindingGpt;
  nanogptCheckpointInfoFile(path: string): CheckpointInfo;
  pickleToJson(bytes: Uint8Array): string;
  checkDevice(name: string): void;
  lrAt(iter: number, schedule: LrSchedule): number;
  estimateMemory(modelArgs: ModelArgs, batchSize: number, training: boolean): MemoryEstimate;
  /** The addon only: ends MPI in this process. */
  finalizeMpi?(): void;
  repeatLinear(backward: boolean, n: number, c: number, oc: number, reps: number): number;
}

interface NativeModule {
  Gpt: {
    create(modelArgs: ModelArgs, seed: number, device: string): BindingGpt;
    fromSafetensorsFile(modelArgs: ModelArgs, path: string, device: string): BindingGpt;
    fromHfGpt2File(configJson: string, path: string, dropout: number, device: string): BindingGpt;
    fromNanogptCheckpointFile(modelArgs: ModelArgs, path: string, device: string): BindingGpt;
  };
  nanogptCheckpointInfoFile(path: string): CheckpointInfo;
  pickleToJson(bytes: Uint8Array): string;
  checkDevice(name: string): void;
  lrAt(iter: number, schedule: LrSchedule): number;
  estimateMemory(modelArgs: ModelArgs, batchSize: number, training: boolean): MemoryEstimate;
  finalizeMpi(): void;
  repeatLinear(backward: boolean, n: number, c: number, oc: number, reps: number): number;
}

/** The wasm-bindgen module: the same engine API, with bytes where the addon takes file paths. */
interface WasmGpt
  extends Omit<
    BindingGpt,
    'loadOptimizerFile' | 'saveWeightsFile' | 'saveOptimizerFile' | 'saveGradientsFile' | 'exportHfFile' | 'loadNanogptOptimizerFile' | 'saveNanogptCheckpointFile'
  > {
  loadOptimizer(bytes: Uint8Array): void;
  loadNanogptOptimizer(bytes: Uint8Array): void;
  saveNanogptCheckpoint(info: CheckpointInfo): Uint8Array;
  saveWeights(): Uint8Array;
  saveOptimizer(): Uint8Array;
  saveGradients(): Uint8Array;
  exportHf(): Uint8Array;
}

interface WasmModule {
  /** Present in a build with atomics and shared memory: starts the engine's thread pool on worker threads. */
  startThreads?(count: number): void;
  initSync(options: { module: Uint8Array }): void;
  __wbg_wasm_module?: unknown;
  __wbg_memory?: unknown;
  Gpt: {
    create(modelArgs: ModelArgs, seed: number): WasmGpt;
    fromSafetensors(modelArgs: ModelArgs, bytes: Uint8Array): WasmGpt;
    fromHfGpt2(configJson: string, bytes: Uint8Array, dropout: number): WasmGpt;
    fromNanogptCheckpoint(modelArgs: ModelArgs, bytes: Uint8Array): WasmGpt;
  };
  nanogptCheckpointInfo(bytes: Uint8Array): CheckpointInfo;
  pickleToJson(bytes: Uint8Array): string;
  checkDevice(name: string): void;
  lrAt(iter: number, schedule: LrSchedule): number;
  estimateMemory(modelArgs: ModelArgs, batchSize: number, training: boolean): MemoryEstimate;
  repeatLinear(backward: boolean, n: number, c: number, oc: number, reps: number): number;
}

export { wasmMemoryLimit } from './wasm-memory.ts';

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
/** How long the GPU ranks of a data-parallel run wait for each other to start (torchrun's own rendezvous waits 900 s). */
const rendezvousTimeoutS = 900;

/** Loaded builds: the WebAssembly module, the CPU addon, the CPU addon with MPI, the CUDA addon and the CUDA addon with NCCL. */
const bindings = new Map<'wasm' | NativeBuild, Binding>();
type NativeBuild = 'native' | 'mpi' | 'cuda' | 'cuda-nccl';

/** The native engine built with MPI (`npm run build:native:mpi`), which the ranks of a data-parallel run load. */
const mpiBuildDir = join(packageRoot, 'native', 'mpi');

export const mpiBuildMissing = `the native engine with MPI is not built (no .node file in ${mpiBuildDir}); run \`npm run build:native:mpi\` (needs OpenMPI: apt-get install -y libopenmpi-dev openmpi-bin libclang-dev)`;

export function mpiBuilt(): boolean {
  return hasAddon(mpiBuildDir);
}

/** The CUDA engine built with NCCL (`npm run build:cuda:nccl`), which the GPU ranks of a data-parallel run load. */
const ncclBuildDir = join(packageRoot, 'native', 'cuda-nccl');

export const ncclBuildMissing = `the CUDA engine with NCCL, which the GPU ranks of a data-parallel run load, is not built (no .node file in ${ncclBuildDir}); run \`npm run build:cuda:nccl\``;

export function ncclBuilt(): boolean {
  return hasAddon(ncclBuildDir);
}

function hasAddon(dir: string): boolean {
  return existsSync(dir) && readdirSync(dir).some((f) => f.endsWith('.node'));
}

/**
 * The build for `kind`; the native kind has a CPU addon and a CUDA addon, chosen by `device`, and in a process that
 * is one of several ranks, the addon built with MPI (CPU) or with NCCL (CUDA).
 */
function loadBinding(kind: EngineKind, device = 'cpu'): Binding {
  const ranks = launchRanks().worldSize > 1;
  const build = kind === 'wasm' ? 'wasm' : device.startsWith('cuda') ? (ranks ? 'cuda-nccl' : 'cuda') : ranks ? 'mpi' : 'native';
  return loadBuild(build);
}

/** A build, loaded once per process; `warnStale`: say when it is older than the Rust sources (see warnIfStale). */
function loadBuild(build: 'wasm' | NativeBuild, warnStale = true): Binding {
  let binding = bindings.get(build);
  if (!binding) {
    binding = build === 'wasm' ? loadWasm(warnStale) : loadNative(build, warnStale);
    bindings.set(build, binding);
  }
  return binding;
}

/**
 * A CPU build that loads (the addon without MPI, else the WebAssembly module), or undefined where neither does; it
 * only checks a device name for a run that cannot start, so it says nothing of its own age.
 */
function anyCpuBinding(): Binding | undefined {
  for (const build of ['native', 'wasm'] as const) {
    try {
      return loadBuild(build, false);
    } catch {
      // not built, or cannot load here: the next one
    }
  }
  return undefined;
}

/**
 * The napi addon: native/ holds the CPU build, native/mpi/ the CPU build with MPI, native/cuda/ the CUDA build and
 * native/cuda-nccl/ the CUDA build with NCCL (separate files, because these cannot even be loaded where OpenMPI, the
 * NVIDIA driver or NCCL is missing).
 */
function loadNative(build: NativeBuild, warnStale: boolean): Binding {
  const cuda = build === 'cuda' || build === 'cuda-nccl';
  const dir = build === 'mpi' ? mpiBuildDir : join(packageRoot, 'native', ...(build === 'native' ? [] : [build]));
  const file = existsSync(dir) ? readdirSync(dir).find((f) => f.endsWith('.node')) : undefined;
  if (!file) {
    throw new UserError(
      build === 'mpi'
        ? mpiBuildMissing
        : build === 'cuda-nccl'
          ? ncclBuildMissing
          : cuda
          ? `the CUDA engine is not built (no .node file in ${dir}); run \`npm run build:cuda\` (needs cargo; it installs a CUDA toolkit from PyPI when nvcc is missing)`
          : `the native engine is not built (no .node file in ${dir}); run \`npm run build:native\` (needs cargo), or use --engine=wasm on cpu`,
    );
  }
  if (warnStale) {
    warnIfStale(
      join(dir, file),
      { native: 'npm run build:native', mpi: 'npm run build:native:mpi', cuda: 'npm run build:cuda', 'cuda-nccl': 'npm run build:cuda:nccl' }[build],
    );
  }
  // Ranks sharing a machine share its cores: as torchrun does with OMP_NUM_THREADS, each gets its part of them
  // unless RAYON_NUM_THREADS says otherwise (read by the engine's thread pool when it starts).
  if (build === 'mpi' && !process.env.RAYON_NUM_THREADS) {
    process.env.RAYON_NUM_THREADS = String(Math.max(1, Math.floor(availableParallelism() / localWorldSize())));
  }
  let native: NativeModule;
  try {
    native = createRequire(import.meta.url)(join(dir, file)) as NativeModule;
  } catch (err) {
    if (!cuda) throw err;
    throw new UserError(
      `cannot load the CUDA engine (${firstLine(err)}); it needs the NVIDIA driver (libcuda.so.1) and CUDA 13 cuBLAS, cuRAND and NVRTC${build === 'cuda-nccl' ? ' and NCCL 2 (libnccl.so.2)' : ''} on LD_LIBRARY_PATH`,
    );
  }
  return {
    kind: 'native',
    build: build === 'mpi' ? 'native' : build,
    create: (args, seed, device) => native.Gpt.create(args, seed, device),
    fromSafetensorsFile: (args, path, device) => native.Gpt.fromSafetensorsFile(args, path, device),
    fromHfGpt2File: (config, path, dropout, device) => native.Gpt.fromHfGpt2File(config, path, dropout, device),
    fromNanogptCheckpointFile: (args, path, device) => native.Gpt.fromNanogptCheckpointFile(args, path, device),
    nanogptCheckpointInfoFile: (path) => native.nanogptCheckpointInfoFile(path),
    pickleToJson: (bytes) => native.pickleToJson(bytes),
    checkDevice: (name) => native.checkDevice(name),
    lrAt: (iter, schedule) => native.lrAt(iter, schedule),
    estimateMemory: (args, batchSize, training) => native.estimateMemory(args, batchSize, training),
    finalizeMpi: () => native.finalizeMpi(),
    repeatLinear: (backward, n, c, oc, reps) => native.repeatLinear(backward, n, c, oc, reps),
  };
}

function loadWasm(warnStale: boolean): Binding {
  const glue = join(packageRoot, 'wasm', 'nanogpt.js');
  if (!existsSync(glue)) {
    throw new UserError(
      `the WebAssembly engine is not built (no ${glue}); run \`npm run build:wasm\` (needs cargo), or use --engine=native`,
    );
  }
  const build = nodeWasmBuild();
  const modulePath = join(packageRoot, 'wasm', build.file);
  if (!existsSync(modulePath)) {
    throw new UserError(`the WebAssembly engine is not built (no ${modulePath}); run \`npm run build:wasm\` (needs cargo), or use --engine=native`);
  }
  if (warnStale) warnIfStale(modulePath, 'npm run build:wasm');
  // A module built with atomics asks for its pool threads through this hook while `startThreads` runs.
  (globalThis as { nanogptSpawnThread?: (thread: number) => void }).nanogptSpawnThread = (thread) => {
    const workerData = { glue, module: wasm.__wbg_wasm_module, memory: wasm.__wbg_memory, thread };
    // Unreferenced: the pool never ends its loop, and must not keep the process alive.
    new Worker(join(packageRoot, 'wasm', 'thread.cjs'), { workerData }).unref();
  };
  const wasm = createRequire(import.meta.url)(glue) as WasmModule;
  // Both builds share this glue, which leaves the choice of module to its loader (scripts/build-wasm.sh).
  wasm.initSync({ module: readFileSync(modulePath) });
  const threads = wasmThreads();
  if (wasm.startThreads && threads > 1) wasm.startThreads(threads);
  // `resolveEngine` sends only the cpu device here.
  return {
    kind: 'wasm',
    build: build.name,
    create: (args, seed) => new WasmFiles(wasm.Gpt.create(args, seed)),
    fromSafetensorsFile: (args, path) => new WasmFiles(wasm.Gpt.fromSafetensors(args, readForWasm(path))),
    fromHfGpt2File: (config, path, dropout) => new WasmFiles(wasm.Gpt.fromHfGpt2(config, readForWasm(path), dropout)),
    fromNanogptCheckpointFile: (args, path) => new WasmFiles(wasm.Gpt.fromNanogptCheckpoint(args, readForWasm(path))),
    nanogptCheckpointInfoFile: (path) => wasm.nanogptCheckpointInfo(readForWasm(path)),
    pickleToJson: (bytes) => wasm.pickleToJson(bytes),
    checkDevice: (name) => wasm.checkDevice(name),
    lrAt: (iter, schedule) => wasm.lrAt(iter, schedule),
    estimateMemory: (args, batchSize, training) => wasm.estimateMemory(args, batchSize, training),
    repeatLinear: (backward, n, c, oc, reps) => wasm.repeatLinear(backward, n, c, oc, reps),
  };
}

/**
 * In a clone (where crates/ exists), says in one line when an engine build is older than the Rust sources; it is
 * never rebuilt behind the user's back (an installed package has no sources, and nothing to say).
 */
function warnIfStale(build: string, command: string): void {
  const crates = join(packageRoot, 'crates');
  if (!existsSync(crates)) return;
  const sources = [join(packageRoot, 'Cargo.toml'), join(packageRoot, 'Cargo.lock'), ...rustSources(crates)];
  const newest = Math.max(...sources.filter((path) => existsSync(path)).map((path) => statSync(path).mtimeMs));
  if (newest > statSync(build).mtimeMs) {
    console.error(`warning: ${relative(packageRoot, build)} is older than the Rust sources in crates/; run \`${command}\` to rebuild it`);
  }
}

function rustSources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === 'target' ? [] : rustSources(path);
    return entry.name.endsWith('.rs') || entry.name === 'Cargo.toml' ? [path] : [];
  });
}

/**
 * The WebAssembly build to load: NANOGPT_WASM_BUILD (relaxed-simd or simd128) to choose one, else the relaxed-SIMD
 * build where V8 compiles relaxed SIMD, which Node.js 20 does behind a flag (set here, before any module compiles;
 * the pool's worker threads instantiate the module compiled on this thread).
 */
function nodeWasmBuild(): WasmBuild {
  if (!hasRelaxedSimd()) setFlagsFromString('--experimental-wasm-relaxed-simd');
  const setting = process.env.NANOGPT_WASM_BUILD;
  if (setting === undefined || setting === '') return pickWasmBuild();
  if (!Object.hasOwn(wasmBuilds, setting)) {
    throw new UserError(`NANOGPT_WASM_BUILD must be one of ${Object.keys(wasmBuilds).join(', ')}, got '${setting}'`);
  }
  if (setting === 'relaxed-simd' && !hasRelaxedSimd()) {
    throw new UserError(`NANOGPT_WASM_BUILD=relaxed-simd, but this Node.js ${process.version} cannot compile relaxed SIMD; use simd128`);
  }
  return wasmBuilds[setting as WasmBuildChoice];
}

/** Threads for the WebAssembly engine's pool: NANOGPT_WASM_THREADS, else one per core. */
function wasmThreads(): number {
  const setting = process.env.NANOGPT_WASM_THREADS;
  if (setting === undefined || setting === '') return availableParallelism();
  const threads = Number(setting);
  if (!Number.isInteger(threads) || threads < 1) {
    throw new UserError(`NANOGPT_WASM_THREADS must be a positive integer, got '${setting}'; 1 runs the engine on one thread`);
  }
  return threads;
}

/** A file's bytes for the WebAssembly engine, which has to hold them in its own 4 GiB as well. */
function readForWasm(path: string): Uint8Array {
  const size = statSync(path).size;
  if (size > wasmMemoryLimit / 2) {
    throw new UserError(
      `${path} holds ${gib(size)} of weights, too many for the WebAssembly engine's 4 GiB memory; use --engine=native`,
    );
  }
  return readFileSync(path);
}

/** Gives the WebAssembly engine, which has no file system, the addon's file-path methods. */
class WasmFiles implements BindingGpt {
  constructor(private readonly gpt: WasmGpt) {}
  modelArgs = () => this.gpt.modelArgs();
  cropBlockSize = (blockSize: number) => this.gpt.cropBlockSize(blockSize);
  numParams = (nonEmbedding: boolean) => this.gpt.numParams(nonEmbedding);
  configureOptimizer = (args: OptimizerArgs) => this.gpt.configureOptimizer(args);
  loadOptimizerFile = (path: string) => this.gpt.loadOptimizer(readForWasm(path));
  forwardBackward = (x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number) =>
    this.gpt.forwardBackward(x, y, batchSize, lossScale);
  accumulate = (x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number) => this.gpt.accumulate(x, y, batchSize, lossScale);
  lastLoss = () => this.gpt.lastLoss();
  setDropoutStream = (seed: number, microStep: number) => this.gpt.setDropoutStream(seed, microStep);
  step = (lr: number) => this.gpt.step(lr);
  evalLoss = (x: Uint32Array, y: Int32Array, batchSize: number) => this.gpt.evalLoss(x, y, batchSize);
  generate = (prompt: Uint32Array, maxNewTokens: number, temperature: number, topK: number, seed: number) =>
    this.gpt.generate(prompt, maxNewTokens, temperature, topK, seed);
  generateBatch = (prompt: Uint32Array, seeds: Uint32Array, maxNewTokens: number, temperature: number, topK: number) =>
    this.gpt.generateBatch(prompt, seeds, maxNewTokens, temperature, topK);
  startSampling = (prompt: Uint32Array, seeds: Uint32Array, temperature: number, topK: number) =>
    this.gpt.startSampling(prompt, seeds, temperature, topK);
  nextTokens = () => this.gpt.nextTokens();
  saveWeightsFile = (path: string) => writeFileSync(path, this.gpt.saveWeights());
  saveOptimizerFile = (path: string) => writeFileSync(path, this.gpt.saveOptimizer());
  saveGradientsFile = (path: string) => writeFileSync(path, this.gpt.saveGradients());
  exportHfFile = (path: string) => writeFileSync(path, this.gpt.exportHf());
  loadNanogptOptimizerFile = (path: string) => this.gpt.loadNanogptOptimizer(readForWasm(path));
  saveNanogptCheckpointFile = (path: string, info: CheckpointInfo) => writeFileSync(path, this.gpt.saveNanogptCheckpoint(info));
  hfConfig = () => this.gpt.hfConfig();
  setPrecision = (dtype: string) => this.gpt.setPrecision(dtype);
  synchronize = () => this.gpt.synchronize();
  memoryStats = () => this.gpt.memoryStats();
  setProfiling = (on: boolean) => this.gpt.setProfiling(on);
  phaseTimes = () => this.gpt.phaseTimes();
}

/** nanoGPT trains on 'cuda' by default; here that needs the CUDA build and an NVIDIA GPU, else 'cpu'. */
export function defaultDevice(): string {
  const cudaDir = join(packageRoot, 'native', 'cuda');
  const cudaBuilt = existsSync(cudaDir) && readdirSync(cudaDir).some((f) => f.endsWith('.node'));
  return cudaBuilt && existsSync('/dev/nvidia0') ? 'cuda' : 'cpu';
}

/** The engine build that runs `device` under the user's `choice`. */
export function resolveEngine(device: string, choice: EngineChoice = 'auto'): EngineKind {
  if (choice === 'auto') return device === 'cpu' ? 'wasm' : 'native';
  if (choice === 'wasm' && device !== 'cpu') {
    throw new UserError(`the WebAssembly engine runs on the cpu only; use --device=cpu, or --engine=native for --device=${device}`);
  }
  return choice;
}

const gib = (bytes: number) => `${(bytes / 2 ** 30).toFixed(2)} GiB`;

function refuseBeyondWasm(need: MemoryEstimate, purpose: MemoryPurpose, batchSize: number, blockSize: number): void {
  const refusal = wasmMemoryRefusal(need, purpose, batchSize, blockSize);
  if (refusal) throw new UserError(`${refusal}, or --engine=native`);
}

function checkDeviceName(binding: Binding | undefined, device: string): void {
  try {
    binding?.checkDevice(device);
  } catch (err) {
    throw new UserError(firstLine(err));
  }
}

/** A GPT in the engine, with its optimizer state once `configureOptimizer` has been called. */
export class Engine {
  private constructor(
    private readonly gpt: BindingGpt,
    private readonly binding: Binding,
    /** The engine build this model lives in. */
    readonly kind: EngineKind,
    /** That build in more detail: 'native', 'cuda', 'cuda-nccl', 'wasm (relaxed-simd)' or 'wasm (simd128)'. */
    readonly build: string,
  ) {}

  private static in(device: string, choice: EngineChoice, make: (binding: Binding) => BindingGpt): Engine {
    const binding = loadBinding(resolveEngine(device, choice), device);
    return new Engine(make(binding), binding, binding.kind, binding.build);
  }

  /**
   * Refuses a device name other than cpu, cuda or cuda:N before a run reads its data or weights, in the build it
   * would run in. Where that build cannot be had (not built, cannot load, or not for this device) the run stops
   * anyway, and a CPU build that loads checks the name first: a misspelt device is named before a build to make.
   */
  static checkDevice(device: string, engine: EngineChoice = 'auto'): void {
    let binding: Binding;
    try {
      binding = loadBinding(resolveEngine(device, engine), device);
    } catch (err) {
      if (device !== 'cpu') checkDeviceName(anyCpuBinding(), device);
      throw err;
    }
    checkDeviceName(binding, device);
  }

  /** A freshly initialised model (nanoGPT's init), deterministic for a given seed. */
  static create(args: ModelArgs, seed: number, device = 'cpu', engine: EngineChoice = 'auto'): Engine {
    return Engine.in(device, engine, (b) => b.create(args, seed, device));
  }

  /**
   * A model whose weights the engine reads from the safetensors file at `path` (names as nanoGPT's state dict).
   * Files are read and written by the engine, not through Node.js Buffers, which stop at 2 GB to 4 GB.
   */
  static fromSafetensorsFile(args: ModelArgs, path: string, device = 'cpu', engine: EngineChoice = 'auto'): Engine {
    return Engine.in(device, engine, (b) => b.fromSafetensorsFile(args, path, device));
  }

  /**
   * A Hugging Face GPT-2 (`config.json` text, and the path of its `model.safetensors`, e.g. OpenAI's weights): the
   * architecture comes from the config, with `dropout` in place of the config's.
   */
  static fromHfGpt2File(configJson: string, path: string, dropout: number, device = 'cpu', engine: EngineChoice = 'auto'): Engine {
    return Engine.in(device, engine, (b) => b.fromHfGpt2File(configJson, path, dropout, device));
  }

  /** A model whose weights the engine reads from nanoGPT's `ckpt.pt` at `path` (`args`: its model_args, any dropout). */
  static fromNanogptCheckpointFile(args: ModelArgs, path: string, device = 'cpu', engine: EngineChoice = 'auto'): Engine {
    return Engine.in(device, engine, (b) => b.fromNanogptCheckpointFile(args, path, device));
  }

  /**
   * Refuses, before the first step, a run that would not fit in this engine: the WebAssembly engine cannot grow past
   * 4 GiB and would otherwise die part-way through. The message says where the memory goes and what to lower.
   */
  checkMemory(batchSize: number, purpose: MemoryPurpose): MemoryEstimate {
    const args = this.modelArgs();
    const need = this.binding.estimateMemory(args, batchSize, purpose !== 'sample');
    if (this.kind === 'wasm') refuseBeyondWasm(need, purpose, batchSize, args.block_size);
    return need;
  }

  /** The same check before the model exists (creating it may not fit either), for the engine build `kind`. */
  static checkMemory(args: ModelArgs, batchSize: number, purpose: MemoryPurpose, kind: EngineKind): void {
    if (kind === 'wasm') refuseBeyondWasm(estimateMemory(args, batchSize, purpose, 'wasm'), purpose, batchSize, args.block_size);
  }

  /** The architecture as it is now (after any `cropBlockSize`). */
  modelArgs(): ModelArgs {
    return this.gpt.modelArgs();
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
    return this.gpt.configureOptimizer(args);
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

  /**
   * `forwardBackward` without reading the loss back: on a GPU the next micro-step is queued while this one runs.
   * `lastLoss` reads it when it is wanted, as nanoGPT calls `loss.item()` only at `log_interval`.
   */
  accumulate(x: Uint32Array, y: Int32Array, batchSize: number, lossScale = 1): void {
    this.gpt.accumulate(x, y, batchSize, lossScale);
  }

  /** The unscaled mean loss of the last micro-step; waits for the device to finish it. */
  lastLoss(): number {
    return this.gpt.lastLoss();
  }

  /**
   * The next micro-step draws the dropout masks of micro-step `microStep` (counted from 0 over the whole run) of a
   * model created with `seed`, and the ones after it follow on: a resumed run draws the masks of the run it resumes.
   */
  setDropoutStream(seed: number, microStep: number): void {
    this.gpt.setDropoutStream(seed, microStep);
  }

  /** Clips (if configured), applies AdamW at `lr` to both groups, and clears the gradients. */
  step(lr: number): StepStats {
    return this.gpt.step(lr);
  }

  /** Mean loss of a batch in evaluation mode (no dropout, no gradients). */
  evalLoss(x: Uint32Array, y: Int32Array, batchSize: number): number {
    return this.gpt.evalLoss(x, y, batchSize);
  }

  /** The prompt followed by `maxNewTokens` sampled tokens (topK 0 = no top-k filter). */
  generate(prompt: Uint32Array, maxNewTokens: number, temperature: number, topK: number, seed: number): Uint32Array {
    return this.gpt.generate(prompt, maxNewTokens, temperature, topK, seed);
  }

  /**
   * One sequence per seed, each what `generate` gives for that seed; on the CPU they decode together as one batch,
   * from a KV cache preallocated for the whole block.
   */
  generateBatch(prompt: Uint32Array, seeds: Uint32Array, maxNewTokens: number, temperature: number, topK: number): Uint32Array[] {
    const all = this.gpt.generateBatch(prompt, seeds, maxNewTokens, temperature, topK);
    const length = prompt.length + maxNewTokens;
    return Array.from(seeds, (_, i) => all.subarray(i * length, (i + 1) * length));
  }

  /**
   * Starts sequences (one per seed) drawn one token at a time by `nextTokens`: the tokens `generateBatch` gives.
   * It replaces any earlier generation; a training step ends it.
   */
  startSampling(prompt: Uint32Array, seeds: Uint32Array, temperature: number, topK: number): void {
    this.gpt.startSampling(prompt, seeds, temperature, topK);
  }

  /** The next token of every sequence `startSampling` began. */
  nextTokens(): Uint32Array {
    return this.gpt.nextTokens();
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

  /** Writes the gradients accumulated since the last `step` to a safetensors file, named as the parameters. */
  saveGradientsFile(path: string): void {
    this.gpt.saveGradientsFile(path);
  }

  /**
   * nanoGPT's `dtype`: float32 (TF32 matmuls on a GPU), or on a GPU bfloat16 / float16 compute with f32 master
   * weights and optimizer state (float16 with dynamic loss scaling). The CPU engines compute in float32 only.
   */
  setPrecision(dtype: Dtype): void {
    this.gpt.setPrecision(dtype);
  }

  /** Waits for the device to finish queued work (for timing; a no-op on the CPU). */
  synchronize(): void {
    this.gpt.synchronize();
  }

  /** Device memory now and at its peak (null on the CPU). */
  memoryStats(): MemoryStats | null {
    return this.gpt.memoryStats();
  }

  /** Times each phase of every step (synchronising between them on a GPU), read back with `phaseTimes`. */
  setProfiling(on: boolean): void {
    this.gpt.setProfiling(on);
  }

  /** The phases of the last step, when profiling. */
  phaseTimes(): PhaseTimes | null {
    return this.gpt.phaseTimes();
  }

  /** Restores the AdamW state of nanoGPT's `ckpt.pt` (call `configureOptimizer` first). */
  loadNanogptOptimizerFile(path: string): void {
    this.gpt.loadNanogptOptimizerFile(path);
  }

  /** Writes nanoGPT's `ckpt.pt`: the weights, the AdamW state when configured, and `info`. */
  saveNanogptCheckpointFile(path: string, info: CheckpointInfo): void {
    this.gpt.saveNanogptCheckpointFile(path, info);
  }

  /** Writes the AdamW state (moments and step) to a safetensors file. */
  saveOptimizerFile(path: string): void {
    this.gpt.saveOptimizerFile(path);
  }

  /**
   * Makes this model one rank of the data-parallel run mpirun started (see distributed.ts): its weights become rank
   * 0's, and every `step` averages the gradients over the ranks first. Call it once the weights are loaded, before
   * the first step. A collective call that waits more than `timeoutSeconds` for the other ranks ends the process.
   * MPI is ended when the process exits successfully; after a failure it is not, so that mpirun stops the other
   * ranks rather than leave them waiting.
   */
  joinDataParallel(timeoutSeconds: number): { rank: number; worldSize: number } {
    const expected = launchRanks();
    // Every addon has the NCCL entry (refusing where NCCL is not built in); only the GPU ranks' build uses it.
    if (this.build === 'cuda-nccl') return this.joinNccl(expected, timeoutSeconds);
    if (!this.gpt.joinMpi) {
      throw new UserError(`the WebAssembly engine has no collectives for data-parallel training across ${expected.worldSize} processes; use --engine=native`);
    }
    const [rank, worldSize] = this.gpt.joinMpi(timeoutSeconds);
    if (rank !== expected.rank || worldSize !== expected.worldSize) {
      throw new UserError(
        `the environment says rank ${expected.rank} of ${expected.worldSize} but MPI sees rank ${rank} of ${worldSize}; start the processes with mpirun -np ${expected.worldSize}`,
      );
    }
    process.once('exit', (code) => {
      if (code === 0) this.binding.finalizeMpi?.();
    });
    return { rank, worldSize };
  }

  /**
   * The GPU ranks torchrun started (one per GPU: `cuda:LOCAL_RANK`) meet at MASTER_ADDR:MASTER_PORT, where rank 0 hands
   * out NCCL's id; then the weights become rank 0's and every `step` averages the gradients over NCCL on the GPUs.
   */
  private joinNccl({ rank, worldSize }: Ranks, timeoutSeconds: number): { rank: number; worldSize: number } {
    const { master } = launchPlacement();
    if (!master) {
      throw new UserError(`the GPU ranks meet at MASTER_ADDR:MASTER_PORT, which are unset; start them with --nproc_per_node=${worldSize} or torchrun, or set both`);
    }
    const [joinedRank, joinedWorldSize] = this.gpt.joinNccl!(master.addr, master.port, rank, worldSize, rendezvousTimeoutS, timeoutSeconds);
    return { rank: joinedRank, worldSize: joinedWorldSize };
  }

  /** Returns once every rank of the data-parallel run has called it. */
  barrier(): void {
    this.gpt.barrier?.();
  }

  /** Whether `flag` is set on any rank of the data-parallel run (`flag` itself on one process). */
  anyRank(flag: boolean): boolean {
    return this.gpt.anyRank?.(flag) ?? flag;
  }

  /**
   * Whether the backward passes of the micro-steps that follow average the gradients over the ranks as they finish
   * them, layer by layer beside the rest of the pass, instead of `step` averaging them all after it: set it for the
   * last micro-step before each `step`, as nanoGPT sets DDP's `require_backward_grad_sync`. The fused CUDA step over
   * NCCL does so; elsewhere `step` averages them.
   */
  setBackwardGradSync(sync: boolean): void {
    this.gpt.setBackwardGradSync?.(sync);
  }

  /**
   * ZeRO stage 1 (`stage` 1) on a data-parallel run of the CPU training step: each rank keeps AdamW's moments for
   * 1/world size of the parameters, and the ranks take the same steps as without it. Call it after
   * `joinDataParallel`, before `configureOptimizer`.
   */
  setZeroStage(stage: number): void {
    if (!this.gpt.setZeroStage) throw new UserError('the WebAssembly engine has no data-parallel training, hence no zero_stage; use --engine=native');
    this.gpt.setZeroStage(stage);
  }

  /**
   * Under ZeRO-1, sends every rank's shard of the AdamW state to rank 0, whose next `saveOptimizerFile` then writes
   * all of it; every rank must call it. Does nothing otherwise.
   */
  gatherOptimizerState(): void {
    this.gpt.gatherOptimizerState?.();
  }
}

/** A binding for engine-independent calls: one already loaded, else whichever build is present. */
function anyBinding(preferred?: EngineKind): Binding {
  if (preferred) return loadBinding(preferred);
  return bindings.values().next().value ?? firstPresent([() => loadBinding('wasm'), () => loadBinding('native'), cudaBinding]);
}

/** The CUDA addon, for engine-independent calls where it is the only build (a GPU machine given it alone). */
const cudaBinding = () => loadBinding('native', 'cuda');

/** The first of `loads` that succeeds; the first one's error if none does. */
function firstPresent(loads: (() => Binding)[]): Binding {
  let first: unknown;
  for (const load of loads) {
    try {
      return load();
    } catch (err) {
      first ??= err;
    }
  }
  throw first;
}

/** nanoGPT's learning rate at iteration `iter`: linear warmup, cosine decay, floor at min_lr. */
export function lrAt(iter: number, schedule: LrSchedule): number {
  return anyBinding().lrAt(iter, schedule);
}

/** The engine's estimate of what training (or sampling) `args` with `batchSize` rows needs in memory. */
export function estimateMemory(args: ModelArgs, batchSize: number, purpose: MemoryPurpose, kind?: EngineKind): MemoryEstimate {
  return anyBinding(kind).estimateMemory(args, batchSize, purpose !== 'sample');
}

/** The CPU build of `kind` in detail, as `Engine.build` names it: 'native', 'wasm (relaxed-simd)' or 'wasm (simd128)'. */
export function engineBuild(kind: EngineKind): string {
  return loadBinding(kind).build;
}

/**
 * Runs the matrix products of one linear layer (n rows, c -> oc) `reps` times in the `kind` CPU build, on one thread
 * of its pool as the training step runs them: the forward inp Wᵀ, or the backward dout W and doutᵀ inp (twice the
 * work). For timing them (bench/gemm.ts).
 */
export function repeatLinear(kind: EngineKind, pass: 'forward' | 'backward', n: number, c: number, oc: number, reps: number): number {
  return loadBinding(kind).repeatLinear(pass === 'backward', n, c, oc, reps);
}

/** The addon reads files itself, so prefer it for them; the WebAssembly build is the fallback. */
function fileBinding(): Binding {
  const loaded = [...bindings.values()].find((b) => b.kind === 'native');
  return loaded ?? firstPresent([() => loadBinding('native'), () => loadBinding('wasm'), cudaBinding]);
}

/** The `model_args`, `iter_num`, `best_val_loss` and `config` in nanoGPT's `ckpt.pt` at `path`. */
export function nanogptCheckpointInfoFile(path: string): CheckpointInfo {
  return fileBinding().nanogptCheckpointInfoFile(path);
}

/** A pickle of plain data (nanoGPT's `meta.pkl`) as JSON text, read by the engine's pickle reader, which runs nothing. */
export function pickleToJson(bytes: Uint8Array): string {
  return anyBinding().pickleToJson(bytes);
}
