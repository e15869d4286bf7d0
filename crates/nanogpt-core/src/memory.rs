//! What a run will need in memory, worked out from its shapes before anything is allocated, so that
//! an engine with a hard ceiling (WebAssembly's 4 GiB address space) can refuse a run that would die
//! part-way through, and say what to lower.

use serde::Serialize;

use crate::decode;
use crate::model::ModelArgs;
use crate::train_step;

/// Bytes by purpose. Every tensor the engine trains with is f32.
#[derive(Debug, Clone, Serialize, PartialEq, ts_rs::TS)]
pub struct MemoryEstimate {
    /// The weights (training keeps two copies: the training step's and the candle model's; sampling on the CPU
    /// a third, the decoder's transposed one).
    pub parameters: u64,
    /// The gradients (micro-steps add into the same buffer).
    pub gradients: u64,
    /// AdamW's two moments (zero when only sampling).
    pub optimizer: u64,
    /// What one micro-batch keeps alive at the peak: saved activations and their gradients during
    /// training, the KV cache and the logits when sampling.
    pub activations: u64,
    pub total: u64,
}

const F32: u64 = 4;

/// What the buffers leave out: gemm's per-thread packing buffers, thread stacks and the allocator's
/// slack; a fixed allowance, from measuring a small run's resident memory on Linux x86-64 (tests/memory.rs),
/// which varied by up to 10 MiB between runs and between machines (AVX2 and AVX-512).
const RUNTIME: u64 = 32 << 20;

/// The attention kernel's per-thread (T, T) score buffers.
fn attention_scratch(args: &ModelArgs) -> u64 {
    3 * (args.block_size * args.block_size) as u64 * rayon::current_num_threads() as u64
}

/// Parameters of the model `args` describes (the tied lm_head counted once, as nanoGPT does).
pub fn parameter_count(args: &ModelArgs) -> u64 {
    train_step::ParamLayout::new(args).len as u64
}

/// Training with micro-batches of `batch_size` rows of `args.block_size` tokens, on the CPU training
/// step: its flat parameter, gradient and moment buffers and its activations, sized by the same
/// functions it allocates with, plus the candle model's copy of the weights (kept for sampling and
/// export), each thread's attention scratch and a fixed allowance for the runtime.
pub fn training(args: &ModelArgs, batch_size: usize) -> MemoryEstimate {
    let params = parameter_count(args);
    let sizes = train_step::activation_sizes(args, batch_size, args.block_size);
    let activations = F32 * (sizes.forward as u64 + sizes.backward as u64 + attention_scratch(args)) + RUNTIME;
    estimate(2 * F32 * params, F32 * (params + sizes.shard_gradients as u64), 2 * F32 * params, activations)
}

/// Sampling `batch_size` sequences on the CPU decoder: its KV cache for the whole block and its
/// per-position buffers, sized by the functions it allocates with, the attention scratch of a window's
/// prefill, and three copies of the weights (the flat parameters, the candle model's and the decoder's
/// transposed one).
pub fn sampling(args: &ModelArgs, batch_size: usize) -> MemoryEstimate {
    let activations = F32 * (decode::buffer_len(args, batch_size) as u64 + attention_scratch(args)) + RUNTIME;
    let weights = F32 * (2 * parameter_count(args) + decode::transposed_weights_len(args) as u64);
    estimate(weights, 0, 0, activations)
}

fn estimate(parameters: u64, gradients: u64, optimizer: u64, activations: u64) -> MemoryEstimate {
    MemoryEstimate { parameters, gradients, optimizer, activations, total: parameters + gradients + optimizer + activations }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gelu, Gpt};
    use candle_core::Device;

    #[test]
    fn parameter_count_matches_the_model() {
        for bias in [false, true] {
            let args = ModelArgs { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 50, bias, dropout: 0.0, gelu: Gelu::Erf };
            let model = Gpt::new(&args, 0, &Device::Cpu).unwrap();
            assert_eq!(parameter_count(&args), model.num_params(false) as u64, "bias={bias}");
        }
    }

    #[test]
    fn gpt2_small_does_not_fit_a_4gib_training_run_at_nanogpts_batch() {
        let args = ModelArgs {
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            block_size: 1024,
            vocab_size: 50304,
            bias: false,
            dropout: 0.0,
            gelu: Gelu::Erf,
        };
        assert_eq!(parameter_count(&args), 124_373_760);
        assert!(training(&args, 12).total > 4 << 30);
        assert!(training(&args, 1).total > sampling(&args, 1).total);
    }
}
