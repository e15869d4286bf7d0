// What the page and its training worker say to each other.
import type { CheckpointInfo } from '../../ts/checkpoint-info.ts';
import type { TrainConfig } from '../../ts/schema.ts';
import type { ZipEntry } from './zip.ts';

export type ToWorker =
  /** Load the engine with this many threads (once, first). */
  | { kind: 'engine'; threads: number }
  /** Tokenize a text into the dataset `name` (nanoGPT's shakespeare_char preparation). */
  | { kind: 'data'; name: string; text: string; blockSize: number }
  /** Train from the current run (or a fresh one) up to config.max_iters. */
  | { kind: 'train'; config: TrainConfig; fresh: boolean }
  | { kind: 'stop' }
  | { kind: 'sample'; prompt: string; maxNewTokens: number; seed: number }
  | { kind: 'checkpoint' }
  /** A checkpoint folder's files (ckpt.json, model.safetensors, optionally optimizer.safetensors and meta.json). */
  | { kind: 'load'; files: ZipEntry[] };

export type FromWorker =
  /** The threads the engine runs on, and which build of the module it is (wasm-build.ts). */
  | { kind: 'engine'; threads: number; build: string }
  | { kind: 'dataset'; name: string; trainTokens: number; valTokens: number; vocabSize: number }
  | { kind: 'model'; params: number; memoryBytes: number; iter: number }
  | { kind: 'iter'; iter: number; loss: number; lr: number; stepMs: number; tokensPerSecond: number; etaSeconds: number }
  | { kind: 'eval'; iter: number; train: number; val: number }
  | { kind: 'sample'; iter: number; text: string }
  | { kind: 'stopped'; iter: number; finished: boolean }
  | { kind: 'checkpoint'; folder: string; files: ZipEntry[] }
  | { kind: 'loaded'; info: CheckpointInfo; optimizer: boolean }
  | { kind: 'error'; message: string };
