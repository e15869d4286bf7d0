//! Data-parallel training over NCCL (the `nccl` feature): a run of one rank, meeting at a rendezvous on
//! localhost, trains as a process without a collective does, through the same NCCL calls a run of several
//! GPUs makes (the broadcast of the weights at join, the in-place average of every gradient at each step,
//! or of each layer's during the backward pass, the barrier), and ZeRO-1's exchanges on the device leave a
//! rank of one as it is. It needs a GPU and NCCL's library, so `cargo test` lists it as ignored: run it with
//! `cargo test --release -p nanogpt-core --features nccl --test nccl -- --ignored` (bench/gpu-check.sh does).
#![cfg(feature = "nccl")]

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Result;
use nanogpt_core::collective::{open_nccl, Collective};
use nanogpt_core::cuda::Kernels;
use nanogpt_core::kernels::cuda::Gpu;
use nanogpt_core::rendezvous::Rendezvous;
use nanogpt_core::{Engine, Gelu, ModelArgs, OptimizerArgs};

const STEPS: usize = 5;

fn args() -> ModelArgs {
    ModelArgs { n_layer: 2, n_head: 4, n_embd: 64, block_size: 32, vocab_size: 97, bias: true, dropout: 0.0, gelu: Gelu::Erf }
}

/// cuda:0 as one rank of an NCCL run.
fn one_rank_on_gpu(engine: &Engine) -> Result<Box<dyn Collective>> {
    let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
    let rendezvous =
        Rendezvous { master_addr: "127.0.0.1".into(), master_port: port, rank: 0, world_size: 1, timeout: Duration::from_secs(30) };
    open_nccl(engine.device(), &rendezvous)
}

/// Step `s`'s batch of 4 rows: the learnable next-id task, shifted per step.
fn batch(s: usize) -> (Vec<u32>, Vec<i32>) {
    let x: Vec<u32> = (0..4 * 32).map(|i| ((i * 7 + s * 3) % 97) as u32).collect();
    let y = x.iter().map(|&v| ((v + 1) % 97) as i32).collect();
    (x, y)
}

/// How the gradients reach the optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// Candle's graph: NCCL averages each parameter's gradient tensor.
    Graph,
    /// The fused step: NCCL averages its flat gradient buffer before the optimizer step...
    Fused,
    /// ...or each layer's range of it during the backward pass, on NCCL's own stream.
    FusedOverlapped,
}

/// The losses of `STEPS` steps on cuda:0 computing in `dtype`, as one rank of an NCCL run or alone.
fn losses(dtype: &str, nccl: bool, path: Path) -> Result<Vec<f32>> {
    let mut engine = Engine::new(&args(), 7, "cuda").unwrap_or_else(|e| panic!("no usable GPU: {e}"));
    if path != Path::Graph {
        engine.train_on_gpu_step(Arc::new(Kernels::new(engine.device())?))?;
    } else {
        engine.train_on_graph()?;
    }
    engine.set_precision(dtype)?;
    if nccl {
        engine.join(one_rank_on_gpu(&engine)?, Duration::from_secs(600))?;
        assert_eq!(engine.rank(), (0, 1));
    }
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 })?;
    let mut losses = Vec::new();
    engine.set_backward_grad_sync(path == Path::FusedOverlapped);
    for s in 0..STEPS {
        let (x, y) = batch(s);
        losses.push(engine.forward_backward(&x, &y, 4, 1.0)?);
        engine.step(3e-3)?;
        engine.barrier();
    }
    Ok(losses)
}

fn same_losses_with_and_without_nccl(dtype: &str, path: Path) -> Result<()> {
    let alone = losses(dtype, false, path)?;
    let over_nccl = losses(dtype, true, path)?;
    eprintln!("{dtype} ({path:?}): alone {alone:?}, over NCCL {over_nccl:?}");
    assert!(alone[STEPS - 1] < alone[0], "{dtype}: training did not lower the loss: {alone:?}");
    for (s, (a, n)) in alone.iter().zip(&over_nccl).enumerate() {
        // One rank's average is its own gradient; only the GPU's reduction order may differ between runs.
        assert!((a - n).abs() <= 1e-4 * a.abs(), "{dtype} step {s}: loss {n} over NCCL, {a} alone");
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn one_rank_over_nccl_trains_as_alone_in_float32() -> Result<()> {
    same_losses_with_and_without_nccl("float32", Path::Graph)
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn one_rank_over_nccl_trains_as_alone_in_bfloat16() -> Result<()> {
    same_losses_with_and_without_nccl("bfloat16", Path::Graph)
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn one_rank_over_nccl_trains_as_alone_on_the_fused_step() -> Result<()> {
    same_losses_with_and_without_nccl("bfloat16", Path::Fused)
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn one_rank_over_nccl_averages_during_the_backward_pass_as_alone() -> Result<()> {
    same_losses_with_and_without_nccl("bfloat16", Path::FusedOverlapped)
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL"]
fn one_rank_zero_stage_1_exchanges_on_the_device_leave_the_values() -> Result<()> {
    let engine = Engine::new(&args(), 7, "cuda").unwrap_or_else(|e| panic!("no usable GPU: {e}"));
    let gpu = Kernels::new(engine.device())?;
    let mut nccl = one_rank_on_gpu(&engine)?;
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let addr = gpu.alloc(bytes.len())?;
    gpu.upload(addr, &bytes)?;
    // What the fused step calls under ZeRO-1: a range of gradients onto its owners (a rank of one owns all),
    // the shards' squared norms summed, the updated shards gathered.
    assert!(nccl.start_reduce_scatter_mean_device(addr, values.len(), 100..600)?);
    nccl.finish_device_means()?;
    assert!(nccl.all_reduce_sum_device(addr, 1)?);
    assert!(nccl.all_gather_device(addr, values.len())?);
    let mut back = vec![0u8; bytes.len()];
    gpu.download(addr, &mut back)?;
    gpu.free(addr)?;
    assert_eq!(back, bytes, "one rank's mean, sum and gather are its own values");
    Ok(())
}
