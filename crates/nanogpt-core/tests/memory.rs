//! The training memory estimate against what a training step really takes: the growth of this
//! process's resident memory (its own test binary, so no other test allocates meanwhile).

use nanogpt_core::{memory, Engine, Gelu, ModelArgs, OptimizerArgs};

/// Resident bytes of this process, from /proc/self/statm (Linux only).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn training_estimate_covers_the_measured_growth() -> candle_core::Result<()> {
    let Some(before) = resident_bytes() else {
        eprintln!("skipped: no /proc/self/statm on this system to measure resident memory");
        return Ok(());
    };
    let args =
        ModelArgs { n_layer: 4, n_head: 4, n_embd: 256, block_size: 128, vocab_size: 65, bias: false, dropout: 0.1, gelu: Gelu::Erf };
    let batch = 8;
    let mut engine = Engine::new(&args, 1, "cpu")?;
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 })?;
    let x: Vec<u32> = (0..batch * args.block_size).map(|i| (i % 65) as u32).collect();
    let y: Vec<i32> = x.iter().map(|&v| ((v + 1) % 65) as i32).collect();
    for _ in 0..2 {
        engine.forward_backward(&x, &y, batch, 1.0)?;
        engine.step(1e-3)?;
        engine.eval_loss(&x, &y, batch)?;
    }
    let grown = resident_bytes().expect("read before").saturating_sub(before);
    let estimate = memory::training(&args, batch).total;
    eprintln!("estimate {estimate} bytes, measured growth {grown} bytes, ratio {:.2}", estimate as f64 / grown as f64);
    assert!(estimate >= grown, "the estimate {estimate} is below the measured growth {grown}");
    assert!(estimate < 3 * grown, "the estimate {estimate} is more than 3x the measured growth {grown}");
    Ok(())
}
