//! Times the training step at the README CPU recipe's shapes (or those given as arguments:
//! n_layer n_head n_embd block_size vocab_size batch_size), phase by phase: forward (with the loss),
//! backward, optimizer, and an evaluation forward.
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
    let (mut forward, mut backward, mut optimizer, mut eval) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..warmup + iters {
        engine.forward_backward(&x, &y, b, 1.0)?;
        engine.step(1e-3)?;
        let start = Instant::now();
        engine.eval_loss(&x, &y, b)?;
        if i >= warmup {
            let phases = engine.phase_times().expect("profiling is on");
            forward += phases.forward_ms;
            backward += phases.backward_ms;
            optimizer += phases.optimizer_ms;
            eval += start.elapsed().as_secs_f64() * 1e3;
        }
    }
    let ms = |total: f64| total / iters as f64;
    println!(
        "forward {:.2} ms, backward {:.2} ms, optimizer {:.2} ms, eval forward {:.2} ms ({} threads)",
        ms(forward),
        ms(backward),
        ms(optimizer),
        ms(eval),
        rayon::current_num_threads()
    );
    Ok(())
}
