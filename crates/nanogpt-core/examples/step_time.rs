//! Times the training step of the README's CPU recipe shapes, split into forward+backward and optimizer.
use std::time::Instant;

use nanogpt_core::{Engine, ModelArgs, OptimizerArgs};

fn main() -> candle_core::Result<()> {
    let args = ModelArgs { n_layer: 4, n_head: 4, n_embd: 128, block_size: 64, vocab_size: 65, bias: false, dropout: 0.0, gelu: Default::default() };
    let mut engine = Engine::new(&args, 1337, "cpu")?;
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.99, grad_clip: 1.0 })?;
    let (b, t) = (12, 64);
    let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % 65) as u32).collect();
    let y: Vec<i32> = (0..b * t).map(|i| (i * 11 % 65) as i32).collect();
    let iters = 50;
    let (mut fb, mut st, mut ev) = (0.0, 0.0, 0.0);
    for i in 0..iters + 5 {
        let t0 = Instant::now();
        engine.forward_backward(&x, &y, b, 1.0)?;
        let t1 = Instant::now();
        engine.step(1e-3)?;
        let t2 = Instant::now();
        engine.eval_loss(&x, &y, b)?;
        let t3 = Instant::now();
        if i >= 5 {
            fb += (t1 - t0).as_secs_f64();
            st += (t2 - t1).as_secs_f64();
            ev += (t3 - t2).as_secs_f64();
        }
    }
    let ms = |s: f64| s / iters as f64 * 1e3;
    println!("forward+backward {:.2} ms, optimizer {:.2} ms, eval forward {:.2} ms", ms(fb), ms(st), ms(ev));
    Ok(())
}
