//! Launches of gelu.cu: GELU (kernels/gelu.rs), exact (erf) or the tanh approximation, forward and backward.

use candle_core::{bail, Result};

use super::{blocks_for, Arg, Gpu, Precision};

/// Threads per block: one 16-byte pack of elements per thread (gelu.cu); 8 warps a block, several blocks
/// per SM, keep enough loads in flight for an elementwise kernel bound by memory bandwidth.
const THREADS: u32 = 256;

/// Blocks for `n` elements of X, a 16-byte pack per thread.
fn grid(x: Precision, n: usize) -> [u32; 3] {
    [blocks_for(n.div_ceil(16 / x.size_in_bytes()), THREADS), 1, 1]
}

/// `out` = gelu(`inp`), `n` elements of X each.
pub fn forward(gpu: &dyn Gpu, x: Precision, out: u64, inp: u64, n: usize, tanh_approximation: bool) -> Result<()> {
    if n == 0 {
        bail!("gelu: no elements to launch on (n = 0)");
    }
    let args = [Arg::Ptr(out), Arg::Ptr(inp), Arg::I64(n as i64), Arg::I32(tanh_approximation as i32)];
    gpu.launch(&x.kernel("gelu_forward"), grid(x, n), [THREADS, 1, 1], 0, &args)
}

/// `dinp` = `dout` * gelu'(`inp`), and `out` = gelu(`inp`) recomputed in the same pass over `inp`, n
/// elements of X each, written: the training step keeps no GELU output, and the MLP's projection needs it
/// for its weight gradient. `dinp` may be `dout`; `out` must overlap neither `inp` nor `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward(gpu: &dyn Gpu, x: Precision, dinp: u64, out: u64, inp: u64, dout: u64, n: usize, tanh_approximation: bool) -> Result<()> {
    if n == 0 {
        bail!("gelu backward: no elements to launch on (n = 0)");
    }
    let args = [Arg::Ptr(dinp), Arg::Ptr(out), Arg::Ptr(inp), Arg::Ptr(dout), Arg::I64(n as i64), Arg::I32(tanh_approximation as i32)];
    gpu.launch(&x.kernel("gelu_backward"), grid(x, n), [THREADS, 1, 1], 0, &args)
}
