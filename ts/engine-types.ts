// Generated from the Rust structs of crates/nanogpt-core by `npm run gen:types` (ts-rs); do not edit.
// The types that cross between the engine and TypeScript, in both bindings.

/**
 * The activation of the MLP. nanoGPT uses PyTorch's exact `nn.GELU()`; OpenAI's GPT-2 weights
 * were trained with the tanh approximation, so loading them needs `Tanh` to reproduce their outputs.
 */
export type Gelu = "erf" | "tanh";

/**
 * The architecture, recorded in checkpoints as `model_args` (nanoGPT's GPTConfig).
 */
export type ModelArgs = { n_layer: number, n_head: number, n_embd: number, block_size: number, vocab_size: number, bias: boolean, dropout: number,
/**
 * 'erf' (nanoGPT's nn.GELU) unless a checkpoint says otherwise; GPT-2 weights use 'tanh'.
 */
gelu?: Gelu, };

export type OptimizerArgs = { weight_decay: number, beta1: number, beta2: number,
/**
 * Clip the global gradient norm to this value; 0 disables clipping.
 */
grad_clip: number, };

/**
 * nanoGPT's `get_lr` inputs.
 */
export type LrSchedule = { learning_rate: number, min_lr: number, warmup_iters: number, lr_decay_iters: number, decay_lr: boolean, };

/**
 * Tensor and element counts of the two groups, for nanoGPT's start-up lines.
 */
export type ParamGroups = { decay_tensors: number, decay_params: number, no_decay_tensors: number, no_decay_params: number, };

export type StepStats = {
/**
 * Global L2 norm of the gradients before clipping.
 */
grad_norm: number, clipped: boolean,
/**
 * ‖Δp‖ / ‖p‖ of this step for every parameter tensor, by name: a network-health figure
 * (around 1e-3 is typical; much larger means the learning rate is too high for that tensor).
 */
update_ratios: Array<[string, number]>,
/**
 * float16 only: the gradients overflowed at this loss scale, so no update was made.
 */
skipped: boolean, };

/**
 * Bytes by purpose. Every tensor the engine trains with is f32.
 */
export type MemoryEstimate = {
/**
 * The weights (training keeps two copies: the training step's and the candle model's; sampling on the CPU
 * a third, the decoder's transposed one).
 */
parameters: number,
/**
 * The gradients (micro-steps add into the same buffer).
 */
gradients: number,
/**
 * AdamW's two moments (zero when only sampling).
 */
optimizer: number,
/**
 * What one micro-batch keeps alive at the peak: saved activations and their gradients during
 * training, the KV cache and the logits when sampling.
 */
activations: number, total: number, };

/**
 * Device memory, in bytes.
 */
export type MemoryStats = {
/**
 * Held by tensors now, and the most held at once since the device was opened (the allocator
 * pool's own counters: what PyTorch's `memory_allocated` / `max_memory_allocated` measure).
 */
in_use_bytes: number, peak_bytes: number,
/**
 * Free and total memory of the whole device, as `nvidia-smi` sees it (every process, and the
 * pool's cached blocks counted as used).
 */
free_bytes: number, total_bytes: number, };

/**
 * Milliseconds of the phases of the last micro-step and optimizer step, each measured up to a
 * device synchronisation (so they add up to the step time on a GPU too).
 */
export type PhaseTimes = {
/**
 * Uploading the batch.
 */
data_ms: number, forward_ms: number,
/**
 * Backward and accumulating the gradients.
 */
backward_ms: number,
/**
 * Clipping and AdamW.
 */
optimizer_ms: number, };

/**
 * What a checkpoint says besides its tensors (the same fields as this project's `ckpt.json`).
 */
export type CheckpointInfo = { model_args: ModelArgs, iter_num: number, best_val_loss: number,
/**
 * The run's config keys (its `dataset` says where the vocabulary is).
 */
config: Record<string, unknown>, };
