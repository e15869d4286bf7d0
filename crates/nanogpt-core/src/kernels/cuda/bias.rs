//! Launches of bias.cu: a linear layer's bias added to its rows (where cuBLASLt's epilogue does not add it) and
//! its gradient (kernels/matmul.rs's bias handling), and dropout applied on its own (the residual dropouts'
//! backward).

use candle_core::{bail, Result};

use super::{blocks_for, Arg, Gpu, Precision};
use crate::kernels::dropout::Mask;

/// Threads per block of the elementwise kernels, 8 warps a block: add_bias takes a 16-byte pack of elements per
/// thread, dropout_apply one element; and of bias_add_chunk_sums, one column per thread.
const THREADS: u32 = 256;
/// The gradient's first stage (bias.cu): blocks of 32 lanes, each a 16-byte pack of columns, by `ROW_LANES`,
/// over chunks of `CHUNK_ROWS` rows.
const LANES: u32 = 32;
const ROW_LANES: u32 = 8;
const CHUNK_ROWS: usize = 64;

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

/// The floats of scratch memory [`backward`] needs for N rows of OC columns: one row of partial sums per
/// chunk of rows.
pub fn backward_scratch_len(n: usize, oc: usize) -> usize {
    n.div_ceil(CHUNK_ROWS) * oc
}

/// Adds the column sums of `dout` (N x OC of X) to `dbias` (OC floats), deterministically, in two launches: each
/// chunk of 64 rows is summed into a row of `scratch` ([`backward_scratch_len`] floats), then each column's
/// chunk sums are added in order. The first launch, which reads dout once, has a block per 64 rows for every
/// 256 (bf16) or 128 (f32) columns: 576 blocks at GPT-2's N = 12288, OC = 768.
pub fn backward(gpu: &dyn Gpu, x: Precision, dbias: u64, scratch: u64, dout: u64, n: usize, oc: usize) -> Result<()> {
    check("bias_backward", n, oc)?;
    if n > i32::MAX as usize {
        bail!("bias_backward: {n} rows is more than 2^31 - 1");
    }
    let chunks = n.div_ceil(CHUNK_ROWS);
    if chunks > 65_535 {
        bail!("bias_backward: {n} rows make {chunks} chunks of {CHUNK_ROWS}, past a grid's 65535 rows; use smaller batches");
    }
    let block_columns = LANES as usize * (16 / x.size_in_bytes());
    let (n_arg, oc_arg) = (Arg::I32(n as i32), Arg::I32(oc as i32));
    gpu.launch(
        &x.kernel("bias_chunk_sums"),
        [blocks_for(oc, block_columns as u32), chunks as u32, 1],
        [LANES, ROW_LANES, 1],
        0,
        &[Arg::Ptr(scratch), Arg::Ptr(dout), n_arg, oc_arg],
    )?;
    let args = [Arg::Ptr(dbias), Arg::Ptr(scratch), Arg::I32(chunks as i32), oc_arg];
    gpu.launch("bias_add_chunk_sums", [blocks_for(oc, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
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
