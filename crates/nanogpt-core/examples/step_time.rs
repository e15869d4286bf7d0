//! Times the training step at the README CPU recipe's shapes (or those given as arguments:
//! n_layer n_head n_embd block_size vocab_size batch_size), phase by phase: forward (with the loss),
//! backward, optimizer, and an evaluation forward: the median of each over 50 steps, which a shared
//! or busy machine disturbs less than the mean.
use std::time::Instant;

use nanogpt_core::{Engine, ModelArgs, OptimizerArgs};

fn main() -> candle_core::Result<()> {
    let given: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("shape arguments are integers")).collect();
    let shape = if given.is_empty() { vec![4, 4, 128, 64, 65, 12] } else { given };
    let &[n_layer, n_head, n_embd, block_size, vocab_size, b] = shape.as_slice() else {
        panic!("arguments: n_layer n_head n_embd block_size vocab_size batch_size")
    };
    let args = ModelArgs { n_layer, n_head, n_embd, block_size, vocab_size, bias: false, dropout: 0.0, gelu: Default::default() };
    let mut engine = Engine::new(&args, 1337, "cpu")?;
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 })?;
    engine.set_profiling(true)?;
    let t = block_size;
    let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % vocab_size) as u32).collect();
    let y: Vec<i32> = (0..b * t).map(|i| (i * 11 % vocab_size) as i32).collect();
    let (warmup, iters) = (5, 50);
    let (mut forward, mut backward, mut optimizer, mut eval) = (vec![], vec![], vec![], vec![]);
    for i in 0..warmup + iters {
        engine.forward_backward(&x, &y, b, 1.0)?;
        engine.step(1e-3)?;
        let start = Instant::now();
        engine.eval_loss(&x, &y, b)?;
        if i >= warmup {
            let phases = engine.phase_times().expect("profiling is on");
            forward.push(phases.forward_ms);
            backward.push(phases.backward_ms);
            optimizer.push(phases.optimizer_ms);
            eval.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    println!(
        "forward {:.2} ms, backward {:.2} ms, optimizer {:.2} ms, eval forward {:.2} ms (medians, {} threads)",
        median(forward),
        median(backward),
        median(optimizer),
        median(eval),
        rayon::current_num_threads()
    );
    Ok(())
}
