//! Launches of bias.cu: a linear layer's bias added to its rows and its gradient (kernels/matmul.rs's bias
//! handling), and dropout applied on its own (the residual dropouts' backward).

use candle_core::{bail, Result};

use super::{blocks_for, Arg, Gpu, Precision};
use crate::kernels::dropout::Mask;

/// Threads per block of the elementwise kernels, 8 warps a block: add_bias takes a 16-byte pack of elements per
/// thread, dropout_apply one element.
const THREADS: u32 = 256;
/// Columns per block of bias_backward (one warp across them) and its row lanes (`ROW_LANES` in bias.cu).
const COLUMNS: u32 = 32;
const ROW_LANES: u32 = 32;

fn check(what: &str, n: usize, oc: usize) -> Result<()> {
    if n == 0 || oc == 0 || oc > i32::MAX as usize {
        bail!("{what}: shape ({n}, {oc}) is empty or has more than 2^31 - 1 columns");
    }
    Ok(())
}

/// Adds `bias` (OC of X) to every row of `out` (N x OC of X).
pub fn add(gpu: &dyn Gpu, x: Precision, out: u64, bias: u64, n: usize, oc: usize) -> Result<()> {
    check("add_bias", n, oc)?;
    let args = [Arg::Ptr(out), Arg::Ptr(bias), Arg::I64(n as i64), Arg::I32(oc as i32)];
    let packs = (n * oc).div_ceil(16 / x.size_in_bytes());
    gpu.launch(&x.kernel("add_bias"), [blocks_for(packs, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
}

/// Adds the column sums of `dout` (N x OC of X) to `dbias` (OC floats), deterministically: one block of
/// 32 columns by 32 row lanes per 32 columns, each summing all N rows in a fixed order. For OC = 768 that
/// is only 24 blocks, but it needs neither atomics nor scratch memory, and it reads dout once.
pub fn backward(gpu: &dyn Gpu, x: Precision, dbias: u64, dout: u64, n: usize, oc: usize) -> Result<()> {
    check("bias_backward", n, oc)?;
    if n > i32::MAX as usize {
        bail!("bias_backward: {n} rows is more than 2^31 - 1");
    }
    let args = [Arg::Ptr(dbias), Arg::Ptr(dout), Arg::I32(n as i32), Arg::I32(oc as i32)];
    gpu.launch(&x.kernel("bias_backward"), [blocks_for(oc, COLUMNS), 1, 1], [COLUMNS, ROW_LANES, 1], 0, &args)
}

/// `out[i]` = `inp[i]` * `mask`'s scale of element i, `n` elements of X; `out` may be `inp` (in place).
pub fn dropout(gpu: &dyn Gpu, x: Precision, out: u64, inp: u64, n: usize, mask: Mask) -> Result<()> {
    if n == 0 {
        bail!("dropout_apply: no elements to launch on (n = 0)");
    }
    let [stream, threshold, keep_scale] = Arg::dropout(Some(mask));
    let args = [Arg::Ptr(out), Arg::Ptr(inp), Arg::I64(n as i64), stream, threshold, keep_scale];
    gpu.launch(&x.kernel("dropout_apply"), [blocks_for(n, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
}
