// The WebAssembly engine's memory ceiling, shared by the CLI and the browser page: wasm32 cannot grow past
// 4 GiB, so a run that would not fit is refused before its first step rather than dying part-way through.
import type { MemoryEstimate } from './engine.ts';

/** wasm32 addresses 4 GiB; the engine's code, stack and allocator slack take a little of it. */
export const wasmMemoryLimit = 4 * 2 ** 30 - 64 * 2 ** 20;

/** What the memory is for: a training run and a benchmark keep gradients and AdamW state, sampling a KV cache. */
export type MemoryPurpose = 'train' | 'bench' | 'sample';

const gib = (bytes: number) => `${(bytes / 2 ** 30).toFixed(2)} GiB`;

/**
 * Why a run needing `need` (the engine's estimate) cannot run in the WebAssembly engine, saying where the memory
 * goes and what to lower; undefined when it fits.
 */
export function wasmMemoryRefusal(need: MemoryEstimate, purpose: MemoryPurpose, batchSize: number, blockSize: number): string | undefined {
  if (need.total <= wasmMemoryLimit) return undefined;
  const parts =
    purpose === 'sample'
      ? `parameters ${gib(need.parameters)}, KV cache and logits ${gib(need.activations)}`
      : `parameters ${gib(need.parameters)}, gradients ${gib(need.gradients)}, AdamW state ${gib(need.optimizer)}, activations ${gib(need.activations)}`;
  const lower = {
    train: `lower batch_size (now ${batchSize}; raise gradient_accumulation_steps to keep the tokens per step) or block_size (${blockSize})`,
    bench: `lower batch_size (now ${batchSize}) or block_size (${blockSize})`,
    sample: `lower num_samples or block_size (${blockSize})`,
  }[purpose];
  const run = { train: 'training run', bench: 'benchmark', sample: 'sampling run' }[purpose];
  return `this ${run} needs about ${gib(need.total)} (${parts}), more than the WebAssembly engine's 4 GiB; ${lower}, use a smaller model`;
}
