//! Times generation on the CPU at the two shapes of `npm run bench:sample` (the README CPU recipe,
//! 10 samples x 500 tokens; the GPU shakespeare_char config, 2 x 300), the engine alone: tokens/s,
//! best of three runs, or at the shape given as arguments: n_layer n_head n_embd block_size samples tokens.
//! Weights are random: the work per token does not depend on them.
use std::time::Instant;

use nanogpt_core::sample::SampleArgs;
use nanogpt_core::{Engine, ModelArgs};

fn main() -> candle_core::Result<()> {
    let given: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("shape arguments are integers")).collect();
    let shapes = match given.as_slice() {
        [] => vec![[4, 4, 128, 64, 10, 500], [6, 6, 384, 256, 2, 300]],
        &[a, b, c, d, e, f] => vec![[a, b, c, d, e, f]],
        _ => panic!("arguments: n_layer n_head n_embd block_size samples tokens"),
    };
    for [n_layer, n_head, n_embd, block_size, samples, tokens] in shapes {
        let args = ModelArgs { n_layer, n_head, n_embd, block_size, vocab_size: 65, bias: false, dropout: 0.0, gelu: Default::default() };
        let engine = Engine::new(&args, 1337, "cpu")?;
        let seeds: Vec<u64> = (0..samples as u64).map(|i| 1000 + i).collect();
        let sample = SampleArgs { max_new_tokens: tokens, temperature: 0.8, top_k: Some(200), seed: 0 };
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = Instant::now();
            engine.generate_batch(&[0], &seeds, &sample)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "{n_layer}x{n_embd} block {block_size}, {samples} x {tokens} tokens: {:.1} tokens/s ({:.2} s, best of 3, {} threads)",
            (samples * tokens) as f64 / best,
            best,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
