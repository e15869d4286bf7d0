//! Autoregressive sampling as nanoGPT's `generate`: temperature, optional top-k, a multinomial
//! draw, the context cropped to the last `block_size` tokens. A KV cache makes each new token
//! cost one position while the sequence still fits in the block.

use candle_core::{Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{Gpt, KvCache};

#[derive(Clone, Debug)]
pub struct SampleArgs {
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// Keep only the `top_k` largest logits (ties with the k-th survive); None keeps all.
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// The prompt followed by `max_new_tokens` sampled tokens.
pub fn generate(model: &Gpt, prompt: &[u32], args: &SampleArgs) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt is empty: give at least one token to start from");
    }
    if args.temperature <= 0.0 {
        candle_core::bail!("temperature must be positive, got {}", args.temperature);
    }
    let block_size = model.args.block_size;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut tokens = prompt.to_vec();
    let mut cache = KvCache::new(model.args.n_layer);
    for _ in 0..args.max_new_tokens {
        let logits = if tokens.len() <= block_size {
            let unseen = &tokens[cache.len()..];
            let idx = Tensor::new(unseen, model.device())?.unsqueeze(0)?;
            model.next_token_logits(&idx, Some(&mut cache))?
        } else {
            // Cropping shifts every position, so cached keys and values no longer apply: recompute
            // the window, exactly as nanoGPT does at every step.
            let window = &tokens[tokens.len() - block_size..];
            let idx = Tensor::new(window, model.device())?.unsqueeze(0)?;
            model.next_token_logits(&idx, None)?
        };
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        tokens.push(sample_token(&logits, args.temperature, args.top_k, &mut rng));
    }
    Ok(tokens)
}

/// One multinomial draw from softmax(logits / temperature) after the top-k filter.
pub fn sample_token(logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut StdRng) -> u32 {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let threshold = match top_k {
        Some(k) if k > 0 && k < scaled.len() => {
            let mut sorted = scaled.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[k - 1]
        }
        _ => f64::NEG_INFINITY,
    };
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|&l| if l < threshold { 0.0 } else { (l - max).exp() }).collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if draw < *w {
            return i as u32;
        }
        draw -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}
