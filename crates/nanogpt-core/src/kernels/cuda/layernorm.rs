//! Launches of layernorm.cu: LayerNorm (kernels/layernorm.rs) forward, the residual add with its dropout
//! fused into the next LayerNorm, and the backward pass.

use candle_core::{bail, Result};

use super::{bias, blocks_for, Arg, Gpu, Precision};
use crate::kernels::dropout::Mask;

/// The dynamic shared memory a block gets without opting in to more (cudaFuncSetAttribute).
const SHARED_BYTES: usize = 48 * 1024;
/// Rows (warps) per block of the forward kernels, at most: 256 threads.
const FORWARD_ROWS: usize = 8;
/// Rows per block of the backward kernel (`BACKWARD_ROWS` in layernorm.cu), and its warps at most: 4 rows
/// each.
const BACKWARD_ROWS: usize = 32;
const BACKWARD_WARPS: usize = 8;

fn check(what: &str, n: usize, c: usize) -> Result<[Arg; 2]> {
    match (i32::try_from(n), i32::try_from(c)) {
        (Ok(n), Ok(c)) if n > 0 && c > 0 => Ok([Arg::I32(n), Arg::I32(c)]),
        _ => bail!("{what}: (N, C) = ({n}, {c}) must each be between 1 and 2^31 - 1"),
    }
}

/// Checks that LayerNorm's kernels take `c` channels.
pub fn check_channels(c: usize) -> Result<()> {
    backward_launch(c).map(|_| ())
}

/// Block and shared memory of the backward kernel: each warp sums its rows' terms of dweight and dbias in
/// 2 x C floats of shared memory; 8 warps a block, fewer where 8 would not fit in 48 KiB.
fn backward_launch(c: usize) -> Result<([u32; 3], u32)> {
    let warps = (SHARED_BYTES / (8 * c)).min(BACKWARD_WARPS);
    if warps == 0 {
        bail!("layernorm_backward: C = {c} is more than the {} channels a block's 48 KiB of shared memory can hold", SHARED_BYTES / 8);
    }
    Ok(([32 * warps as u32, 1, 1], (8 * warps * c) as u32))
}

/// Grid, block and shared memory of the forward kernels: a warp per row, each caching its row as C
/// floats in shared memory; up to 8 rows a block, fewer where 8 rows would not fit in 48 KiB.
fn forward_launch(what: &str, n: usize, c: usize) -> Result<([u32; 3], [u32; 3], u32)> {
    let rows = (SHARED_BYTES / (4 * c)).min(FORWARD_ROWS);
    if rows == 0 {
        bail!("{what}: C = {c} is more than the {} channels a block's 48 KiB of shared memory can hold", SHARED_BYTES / 4);
    }
    Ok(([blocks_for(n, rows as u32), 1, 1], [32 * rows as u32, 1, 1], (4 * rows * c) as u32))
}

/// `out` (N x C of X) = LayerNorm of `inp`'s rows times `weight` plus `bias` (C of X each; no bias when
/// None), written; each row's mean and 1/std go to `mean` and `rstd` (N floats each).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &dyn Gpu,
    x: Precision,
    out: u64,
    mean: u64,
    rstd: u64,
    inp: u64,
    weight: u64,
    bias: Option<u64>,
    n: usize,
    c: usize,
) -> Result<()> {
    let [n_arg, c_arg] = check("layernorm_forward", n, c)?;
    let (grid, block, shared) = forward_launch("layernorm_forward", n, c)?;
    let args = [Arg::Ptr(out), Arg::Ptr(mean), Arg::Ptr(rstd), Arg::Ptr(inp), Arg::Ptr(weight), Arg::Ptr(bias.unwrap_or(0)), n_arg, c_arg];
    gpu.launch(&x.kernel("layernorm_forward"), grid, block, shared, &args)
}

/// `residual_out` = `inp` + dropout(`branch`) (all N x C of X; `mask` is the AttentionResidual or
/// MlpResidual site's, element row * C + c), then `ln_out` = LayerNorm of `residual_out` as stored, with
/// `mean` and `rstd` as [`forward`]. One launch, one read of each input. `residual_out` may be `inp`.
#[allow(clippy::too_many_arguments)]
pub fn residual_forward(
    gpu: &dyn Gpu,
    x: Precision,
    residual_out: u64,
    ln_out: u64,
    mean: u64,
    rstd: u64,
    inp: u64,
    branch: u64,
    weight: u64,
    bias: Option<u64>,
    n: usize,
    c: usize,
    mask: Option<Mask>,
) -> Result<()> {
    let [n_arg, c_arg] = check("residual_layernorm_forward", n, c)?;
    let (grid, block, shared) = forward_launch("residual_layernorm_forward", n, c)?;
    let [stream, threshold, keep_scale] = Arg::dropout(mask);
    let args = [
        Arg::Ptr(residual_out),
        Arg::Ptr(ln_out),
        Arg::Ptr(mean),
        Arg::Ptr(rstd),
        Arg::Ptr(inp),
        Arg::Ptr(branch),
        Arg::Ptr(weight),
        Arg::Ptr(bias.unwrap_or(0)),
        n_arg,
        c_arg,
        stream,
        threshold,
        keep_scale,
    ];
    gpu.launch(&x.kernel("residual_layernorm_forward"), grid, block, shared, &args)
}

/// The floats of scratch memory [`backward`] needs for N rows of C channels: each block's partial sums
/// of the weight and bias gradients, then the scratch of the bias gradient's kernel that adds them up.
pub fn backward_scratch_len(n: usize, c: usize) -> usize {
    let blocks = n.div_ceil(BACKWARD_ROWS);
    2 * blocks * c + bias::backward_scratch_len(blocks, c)
}

/// The backward pass, in two launches. The input gradient goes to `dinp` (N x C of X): added to it when
/// `add_to_dinp` (the residual stream's gradient, which already holds the skip connection's share), else
/// written. The weight and bias gradients (C floats each; no bias when None) are added to,
/// deterministically: the first launch writes each block's partial sums over its 32 rows to `scratch`
/// ([`backward_scratch_len`] floats), and bias_backward adds their column sums. `mean` and `rstd` are the
/// forward pass's; `dout` and `inp` are N x C, `weight` C, of X. `dinp` must not overlap `dout` or
/// `inp`: the first launch reads them again after writing dinp.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &dyn Gpu,
    x: Precision,
    dinp: u64,
    dweight: u64,
    dbias: Option<u64>,
    scratch: u64,
    dout: u64,
    inp: u64,
    weight: u64,
    mean: u64,
    rstd: u64,
    n: usize,
    c: usize,
    add_to_dinp: bool,
) -> Result<()> {
    let [n_arg, c_arg] = check("layernorm_backward", n, c)?;
    let (block, shared) = backward_launch(c)?;
    let blocks = n.div_ceil(BACKWARD_ROWS);
    let args = [
        Arg::Ptr(dinp),
        Arg::Ptr(scratch),
        Arg::Ptr(dout),
        Arg::Ptr(inp),
        Arg::Ptr(weight),
        Arg::Ptr(mean),
        Arg::Ptr(rstd),
        n_arg,
        c_arg,
        Arg::I32(add_to_dinp as i32),
    ];
    gpu.launch(&x.kernel("layernorm_backward"), [blocks as u32, 1, 1], block, shared, &args)?;
    let (bias_partials, sums_scratch) = (scratch + (4 * blocks * c) as u64, scratch + (8 * blocks * c) as u64);
    bias::backward(gpu, Precision::F32, dweight, sums_scratch, scratch, blocks, c)?;
    if let Some(dbias) = dbias {
        bias::backward(gpu, Precision::F32, dbias, sums_scratch, bias_partials, blocks, c)?;
    }
    Ok(())
}
