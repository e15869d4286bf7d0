//! Launches causal self-attention's kernels (attention.cu), the CUDA counterpart of
//! [`crate::kernels::attention`]: flash attention with no (T, T) buffer, on tensor cores for bf16 at
//! head sizes 64 and 128, on CUDA cores otherwise.

use candle_core::{bail, Result};

use super::{Arg, Gpu, Precision};
use crate::kernels::dropout::Mask;

/// Head sizes (C / n_head) with compiled kernels: the tile shapes are compile-time.
pub const HEAD_SIZES: [usize; 4] = [16, 32, 64, 128];

/// attention.cu's `attention::WARPS`: every kernel's block is this many warps.
const WARPS: u32 = 4;

/// Rows (queries or keys) one block of each kernel owns: attention.cu's `FORWARD_ROWS` and
/// `BACKWARD_ROWS<HS>` rows per warp, times [`WARPS`].
fn rows_per_block(forward: bool, hs: usize) -> u32 {
    let rows_per_warp = if forward || hs < 128 { 4 } else { 2 };
    rows_per_warp * WARPS
}

/// The head size, after checking that the shape has kernels and fits their grid and indices.
fn head_size(what: &str, b: usize, t: usize, c: usize, n_head: usize) -> Result<usize> {
    if b == 0 || t == 0 || n_head == 0 || !c.is_multiple_of(n_head) {
        bail!("{what}: B={b}, T={t} and n_head={n_head} must be positive, and n_head must divide C={c}");
    }
    let hs = c / n_head;
    if !HEAD_SIZES.contains(&hs) {
        bail!("{what}: no CUDA kernel for head size {hs} (C={c} / n_head={n_head}); choose n_head so that C / n_head is 16, 32, 64 or 128");
    }
    if b * n_head > 65_535 || b * t * 3 * c > i32::MAX as usize {
        bail!("{what}: B={b} x n_head={n_head} must be at most 65535 and B*T*3C below 2^31 (B={b}, T={t}, C={c}); use smaller batches");
    }
    Ok(hs)
}

/// A block per (tile of rows, b, h): the tiles of one (b, h) share its K and V (or Q and dout) through
/// L2, and T / 16 x B·NH blocks of 4 warps (9216 for GPT-2's forward at B=12, T=1024) fill every SM
/// several times over; attention.cu's header gives the block's registers and shared memory.
fn grid(forward: bool, b: usize, t: usize, n_head: usize, hs: usize) -> [u32; 3] {
    [t.div_ceil(rows_per_block(forward, hs) as usize) as u32, (b * n_head) as u32, 1]
}

const BLOCK: [u32; 3] = [WARPS * 32, 1, 1];

/// Rows (queries or keys) per block of the tensor-core kernels, and the rows of their shared-memory
/// tiles: attention.cu's `TC_ROWS`, 16 per warp.
const TC_ROWS: usize = 64;

/// Queries per block of the tensor-core forward: attention.cu's `FORWARD_ROWS<HS>`, two tiles of 16 per
/// warp at head size 64, one at 128.
fn tc_forward_rows(hs: usize) -> usize {
    if hs == 64 {
        2 * TC_ROWS
    } else {
        TC_ROWS
    }
}

/// Whether the shape runs on the tensor-core kernels (attention.cu's `attention_tc`).
fn tensor_cores(x: Precision, hs: usize) -> bool {
    x == Precision::Bf16 && (hs == 64 || hs == 128)
}

/// Dynamic shared memory of a tensor-core kernel, laid out as attention.cu's `attention_tc` says: 64 x
/// (hs + 8) bf16 tiles, four in the forward (K and V, double-buffered), six in the backward (the block's
/// own two, and the other side's two double-buffered), then in the backward 2 x 2 x 64 floats (a query
/// tile's lse and D_i, double-buffered). Forward 36 / 68 KiB, backward 55 / 103 KiB at hs 64 / 128.
fn tc_shared_bytes(forward: bool, hs: usize) -> u32 {
    let tile = TC_ROWS * (hs + 8) * 2;
    if forward {
        (4 * tile) as u32
    } else {
        (6 * tile + 4 * TC_ROWS * 4) as u32
    }
}

/// Blocks of the tensor-core kernels: one per (`rows` rows, b, h).
fn tc_grid(rows: usize, b: usize, t: usize, n_head: usize) -> [u32; 3] {
    [t.div_ceil(rows) as u32, (b * n_head) as u32, 1]
}

/// `out` (B, T, C) and `lse` (float, (B, NH, T), each query's log-sum-exp of its scaled scores,
/// kept for [`backward`]) from `qkv` (B, T, 3C): softmax(q kᵀ / sqrt(hs)) v per head, causal, with
/// `dropout` (the Attention site's mask) on the attention weights. Both outputs are written.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &dyn Gpu,
    x: Precision,
    out: u64,
    lse: u64,
    qkv: u64,
    b: usize,
    t: usize,
    c: usize,
    n_head: usize,
    dropout: Option<Mask>,
) -> Result<()> {
    let hs = head_size("attention forward", b, t, c, n_head)?;
    let [stream, threshold, keep] = Arg::dropout(dropout);
    let args = [
        Arg::Ptr(out),
        Arg::Ptr(lse),
        Arg::Ptr(qkv),
        Arg::I32(t as i32),
        Arg::I32(c as i32),
        Arg::I32(n_head as i32),
        stream,
        threshold,
        keep,
    ];
    if tensor_cores(x, hs) {
        return gpu.launch(
            &format!("attention_forward_tc_hs{hs}_bf16"),
            tc_grid(tc_forward_rows(hs), b, t, n_head),
            BLOCK,
            tc_shared_bytes(true, hs),
            &args,
        );
    }
    gpu.launch(&x.kernel(&format!("attention_forward_hs{hs}")), grid(true, b, t, n_head, hs), BLOCK, 0, &args)
}

/// `dqkv` (B, T, 3C), written in full, from `dout` (B, T, C), given the forward's `qkv`, `out`,
/// `lse` and the same `dropout` mask. `delta_scratch` is float (B, NH, T): the first kernel writes
/// each query's dout·out there (and dQ), the second reads it (and writes dK, dV).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &dyn Gpu,
    x: Precision,
    dqkv: u64,
    dout: u64,
    qkv: u64,
    out: u64,
    lse: u64,
    delta_scratch: u64,
    b: usize,
    t: usize,
    c: usize,
    n_head: usize,
    dropout: Option<Mask>,
) -> Result<()> {
    let hs = head_size("attention backward", b, t, c, n_head)?;
    let [stream, threshold, keep] = Arg::dropout(dropout);
    // Both kernels take the same grid: a block per (tile of rows, b, h), queries then keys.
    let (names, grid, shared) = if tensor_cores(x, hs) {
        let names = [format!("attention_backward_query_tc_hs{hs}_bf16"), format!("attention_backward_key_tc_hs{hs}_bf16")];
        (names, tc_grid(TC_ROWS, b, t, n_head), tc_shared_bytes(false, hs))
    } else {
        let names = [x.kernel(&format!("attention_backward_query_hs{hs}")), x.kernel(&format!("attention_backward_key_hs{hs}"))];
        (names, grid(false, b, t, n_head, hs), 0)
    };
    let (t, c, n_head) = (Arg::I32(t as i32), Arg::I32(c as i32), Arg::I32(n_head as i32));
    let query = [
        Arg::Ptr(dqkv),
        Arg::Ptr(delta_scratch),
        Arg::Ptr(dout),
        Arg::Ptr(qkv),
        Arg::Ptr(out),
        Arg::Ptr(lse),
        t,
        c,
        n_head,
        stream,
        threshold,
        keep,
    ];
    gpu.launch(&names[0], grid, BLOCK, shared, &query)?;
    let key =
        [Arg::Ptr(dqkv), Arg::Ptr(dout), Arg::Ptr(qkv), Arg::Ptr(lse), Arg::Ptr(delta_scratch), t, c, n_head, stream, threshold, keep];
    gpu.launch(&names[1], grid, BLOCK, shared, &key)
}
