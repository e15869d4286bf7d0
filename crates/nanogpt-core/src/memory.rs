//! What a run will need in memory, worked out from its shapes before anything is allocated, so that
//! an engine with a hard ceiling (WebAssembly's 4 GiB address space) can refuse a run that would die
//! part-way through, and say what to lower.

use serde::Serialize;

use crate::model::ModelArgs;

/// Bytes by purpose. Every tensor the engine trains with is f32.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemoryEstimate {
    pub parameters: u64,
    /// The gradients of one backward pass plus the running sum over gradient-accumulation micro-steps.
    pub gradients: u64,
    /// AdamW's two moments (zero when only sampling).
    pub optimizer: u64,
    /// What one micro-batch keeps alive at the peak: saved activations and their gradients during
    /// training, the KV cache and the logits when sampling.
    pub activations: u64,
    pub total: u64,
}

const F32: u64 = 4;

/// Parameters of the model `args` describes (the tied lm_head counted once, as nanoGPT does).
pub fn parameter_count(args: &ModelArgs) -> u64 {
    let c = args.n_embd as u64;
    let b = u64::from(args.bias);
    let layer_norm = c + b * c;
    let block = 2 * layer_norm + (3 * c * c + b * 3 * c) + (c * c + b * c) + (4 * c * c + b * 4 * c) + (4 * c * c + b * c);
    args.vocab_size as u64 * c + args.block_size as u64 * c + args.n_layer as u64 * block + layer_norm
}

/// Training with micro-batches of `batch_size` rows of `args.block_size` tokens.
pub fn training(args: &ModelArgs, batch_size: usize) -> MemoryEstimate {
    let tokens = (batch_size * args.block_size) as u64;
    let c = args.n_embd as u64;
    // Per token and layer the forward pass keeps about 20 widths alive for the backward pass (block input,
    // two LayerNorm outputs, q/k/v, attention output, two residual sums, the 4x-wide MLP hidden before and
    // after GELU, the projections). Attention probabilities are recomputed in the backward pass, not kept.
    let saved = tokens * (20 * c * args.n_layer as u64 + 2 * c);
    // The logits, their softmax and its gradient are the largest single tensors for small models.
    let logits = 3 * tokens * args.vocab_size as u64;
    // During the backward pass each saved activation gets a gradient of its own before it is freed.
    let activations = F32 * (2 * saved + logits);
    let params = F32 * parameter_count(args);
    estimate(params, 2 * params, 2 * params, activations)
}

/// Sampling `batch_size` sequences with a KV cache over the whole context.
pub fn sampling(args: &ModelArgs, batch_size: usize) -> MemoryEstimate {
    let rows = (batch_size * args.block_size) as u64;
    let kv_cache = 2 * rows * args.n_embd as u64 * args.n_layer as u64;
    // Recomputing a full window (after the context fills up) holds a layer's activations and its logits.
    let window = rows * (20 * args.n_embd as u64 + args.vocab_size as u64);
    estimate(F32 * parameter_count(args), 0, 0, F32 * (kv_cache + window))
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
        let args = ModelArgs { n_layer: 12, n_head: 12, n_embd: 768, block_size: 1024, vocab_size: 50304, bias: false, dropout: 0.0, gelu: Gelu::Erf };
        assert_eq!(parameter_count(&args), 124_373_760);
        assert!(training(&args, 12).total > 4 << 30);
        assert!(training(&args, 1).total > sampling(&args, 1).total);
    }
}
