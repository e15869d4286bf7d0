//! Launches of encoder.cu: the token plus position embedding with the embedding dropout fused in
//! (kernels/embedding.rs), forward and backward.

use candle_core::{bail, Result};

use super::{blocks_for, Arg, Gpu, Precision};
use crate::kernels::dropout::Mask;

/// Threads per block: one output element (forward) or one (t, c) position of the gradient (backward) per
/// thread, consecutive threads on consecutive channels; 8 warps a block.
const THREADS: u32 = 256;

fn shape(what: &str, b: usize, t: usize, c: usize) -> Result<[Arg; 3]> {
    match (i32::try_from(b), i32::try_from(t), i32::try_from(c)) {
        (Ok(b), Ok(t), Ok(c)) if b > 0 && t > 0 && c > 0 => Ok([Arg::I32(b), Arg::I32(t), Arg::I32(c)]),
        _ => bail!("{what}: (B, T, C) = ({b}, {t}, {c}) must each be between 1 and 2^31 - 1"),
    }
}

/// `out` (B, T, C of X) = dropout(wte[tokens[b, t]] + wpe[t]), written. `tokens` holds B x T i32 ids,
/// each below wte's row count (on the device, so not checked here); `wte` is (V, C) and `wpe` (at least
/// T, C), both of X. `mask` is the Embedding site's, over the whole (B, T, C) tensor.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &dyn Gpu,
    x: Precision,
    out: u64,
    tokens: u64,
    wte: u64,
    wpe: u64,
    b: usize,
    t: usize,
    c: usize,
    mask: Option<Mask>,
) -> Result<()> {
    let [b_arg, t_arg, c_arg] = shape("encoder_forward", b, t, c)?;
    let [stream, threshold, keep_scale] = Arg::dropout(mask);
    let args = [Arg::Ptr(out), Arg::Ptr(tokens), Arg::Ptr(wte), Arg::Ptr(wpe), b_arg, t_arg, c_arg, stream, threshold, keep_scale];
    gpu.launch(&x.kernel("encoder_forward"), [blocks_for(b * t * c, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
}

/// The backward pass: `dout` (B, T, C of X) is overwritten with itself times `mask` (the gradient of the
/// sum before dropout), then added to its tokens' rows of `dwte` (V x C floats) and, summed over b, to
/// `dwpe[t]` (T x C floats; rows past T are untouched). dwpe is deterministic; dwte takes atomic adds
/// (tokens repeat), so its last bits may vary between runs.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &dyn Gpu,
    x: Precision,
    dwte: u64,
    dwpe: u64,
    dout: u64,
    tokens: u64,
    b: usize,
    t: usize,
    c: usize,
    mask: Option<Mask>,
) -> Result<()> {
    let [b_arg, t_arg, c_arg] = shape("encoder_backward", b, t, c)?;
    let [stream, threshold, keep_scale] = Arg::dropout(mask);
    let args = [Arg::Ptr(dwte), Arg::Ptr(dwpe), Arg::Ptr(dout), Arg::Ptr(tokens), b_arg, t_arg, c_arg, stream, threshold, keep_scale];
    gpu.launch(&x.kernel("encoder_backward"), [blocks_for(t * c, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
}
