//! Launches causal self-attention's kernels (attention.cu), the CUDA counterpart of
//! [`crate::kernels::attention`]: flash attention with no (T, T) buffer, on tensor cores for bf16 at
//! head sizes 64 and 128, on CUDA cores otherwise.

use candle_core::{bail, Result};

use super::{Arg, Gemm, Gpu, Precision};
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
    if b == 0 || t == 0 {
        bail!("{what}: B={b} and T={t} must be positive");
    }
    let hs = kernel_head_size(what, c, n_head)?;
    if b * n_head > 65_535 || b * t * 3 * c > i32::MAX as usize {
        bail!("{what}: B={b} x n_head={n_head} must be at most 65535 and B*T*3C below 2^31 (B={b}, T={t}, C={c}); use smaller batches");
    }
    Ok(hs)
}

/// The head size of `n_head` heads in `c` channels, checked to have kernels.
fn kernel_head_size(what: &str, c: usize, n_head: usize) -> Result<usize> {
    if n_head == 0 || !c.is_multiple_of(n_head) {
        bail!("{what}: n_head={n_head} must be positive and divide C={c}");
    }
    let hs = c / n_head;
    if !HEAD_SIZES.contains(&hs) {
        bail!("{what}: no CUDA kernel for head size {hs} (C={c} / n_head={n_head}); choose n_head so that C / n_head is 16, 32, 64 or 128");
    }
    Ok(hs)
}

/// Checks that `gpu` runs attention over `c` channels in `n_head` heads in precision `x`, with or without `dropout`:
/// kernels for the head size, and on the tensor cores, room for their tiles in a block's shared memory. Where cuDNN
/// runs the passes instead (bf16 without dropout, when asked for), a launch that still falls to the tensor-core
/// kernels checks them then.
pub fn check_model(gpu: &dyn Gpu, x: Precision, c: usize, n_head: usize, dropout: bool) -> Result<()> {
    let hs = kernel_head_size("attention", c, n_head)?;
    let on_cudnn = gpu.attention_kernels() == AttentionKernels::Cudnn && !dropout;
    if tensor_cores(x, hs) && !on_cudnn {
        let (_, rows) = tc_shape(gpu, hs);
        for kernel in [TcKernel::Forward, TcKernel::Query, TcKernel::Key] {
            tc_shared_bytes_on(gpu, kernel, hs, rows)?;
        }
    }
    Ok(())
}

/// A block per (tile of rows, b, h): the tiles of one (b, h) share its K and V (or Q and dout) through
/// L2, and T / 16 x B·NH blocks of 4 warps (9216 for GPT-2's forward at B=12, T=1024) fill every SM
/// several times over; attention.cu's header gives the block's registers and shared memory.
fn grid(forward: bool, b: usize, t: usize, n_head: usize, hs: usize) -> [u32; 3] {
    [t.div_ceil(rows_per_block(forward, hs) as usize) as u32, (b * n_head) as u32, 1]
}

const BLOCK: [u32; 3] = [WARPS * 32, 1, 1];

/// Rows of the tensor-core kernels' shared-memory tiles: attention.cu's `TC_ROWS`.
const TC_ROWS: usize = 64;

/// Columns (keys, or queries for the dK/dV kernel) of the tensor-core kernels' tiles of the other side:
/// attention.cu's `TC_COLS`.
const TC_COLS: usize = 64;

/// Rows (queries, or keys in the dK/dV kernel) each warp of the tensor-core kernels owns at head size 64; at 128
/// it is always 16. A [`Gpu`] says which it runs ([`Gpu::attention_warp_rows`]): 32 unless asked for 16
/// (`NANOGPT_CUDA_ATTENTION_WARP_ROWS=16` on a CUDA device), to compare the two on a GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WarpRows {
    /// Two tiles of 16 a warp, 128-row blocks: each operand read from shared memory feeds two products.
    #[default]
    ThirtyTwo,
    /// One tile of 16 a warp, 64-row blocks: fewer registers a warp, so more blocks per SM.
    Sixteen,
}

impl WarpRows {
    /// The setting of `NANOGPT_CUDA_ATTENTION_WARP_ROWS`, 32 where it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("NANOGPT_CUDA_ATTENTION_WARP_ROWS").as_deref() {
            Ok("32") | Err(_) => Ok(WarpRows::ThirtyTwo),
            Ok("16") => Ok(WarpRows::Sixteen),
            Ok(other) => bail!("NANOGPT_CUDA_ATTENTION_WARP_ROWS must be 16 or 32, got `{other}`"),
        }
    }

    pub fn rows(self) -> usize {
        match self {
            WarpRows::ThirtyTwo => 32,
            WarpRows::Sixteen => 16,
        }
    }
}

/// Which kernels run attention in bf16 without dropout on a CUDA device: the engine's (attention.cu) unless asked
/// for cuDNN's (`NANOGPT_CUDA_ATTENTION=cudnn`). cuDNN draws dropout from a generator of its own, not the
/// engine's counter-based one, so a pass with dropout runs on the engine's kernels either way; float32 too. cuDNN's
/// backward adds up dQ in an order that varies from run to run, where the engine's kernels repeat bit for bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernels {
    #[default]
    Engine,
    /// cuDNN's fused flash attention (its SDPA graphs), loaded from libcudnn.so.9 at the first use.
    Cudnn,
}

impl AttentionKernels {
    /// The setting of `NANOGPT_CUDA_ATTENTION`, the engine's kernels where it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("NANOGPT_CUDA_ATTENTION").as_deref() {
            Ok("engine") | Err(_) => Ok(AttentionKernels::Engine),
            Ok("cudnn") => Ok(AttentionKernels::Cudnn),
            Ok(other) => bail!("NANOGPT_CUDA_ATTENTION must be engine or cudnn, got `{other}`"),
        }
    }
}

/// One pass of causal attention for cuDNN, with the buffers and layouts of [`forward`] and [`backward`] (bf16
/// activations, float lse), none of it with dropout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudnnCall {
    Forward { out: u64, lse: u64, qkv: u64, b: usize, t: usize, c: usize, n_head: usize },
    Backward { dqkv: u64, dout: u64, qkv: u64, out: u64, lse: u64, b: usize, t: usize, c: usize, n_head: usize },
}

/// `gpu` itself, but with attention on `kernels` and, on the engine's tensor-core kernels at head size 64,
/// `warp_rows` rows a warp: to compare them on one GPU, in one process.
pub struct WithAttention<'a> {
    pub gpu: &'a dyn Gpu,
    pub kernels: AttentionKernels,
    pub warp_rows: WarpRows,
}

impl Gpu for WithAttention<'_> {
    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()> {
        self.gpu.launch(kernel, grid, block, shared_bytes, args)
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.gpu.alloc(bytes)
    }
    fn free(&self, addr: u64) -> Result<()> {
        self.gpu.free(addr)
    }
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.gpu.upload(dst, src)
    }
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.gpu.download(src, dst)
    }
    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.gpu.zero(dst, bytes)
    }
    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.gpu.gemm(g)
    }
    fn max_shared_bytes(&self) -> u32 {
        self.gpu.max_shared_bytes()
    }
    fn attention_warp_rows(&self) -> WarpRows {
        self.warp_rows
    }
    fn attention_kernels(&self) -> AttentionKernels {
        self.kernels
    }
    fn cudnn_attention(&self, call: &CudnnCall) -> Result<()> {
        self.gpu.cudnn_attention(call)
    }
}

/// The tensor-core kernels, which differ in shared memory.
#[derive(Clone, Copy)]
enum TcKernel {
    Forward,
    Query,
    Key,
}

impl TcKernel {
    fn name(self) -> &'static str {
        match self {
            TcKernel::Forward => "attention_forward",
            TcKernel::Query => "attention_backward_query",
            TcKernel::Key => "attention_backward_key",
        }
    }
}

/// The tensor-core kernels' shape at head size `hs` on `gpu`: the kernels' name infix (attention.cu's entry points)
/// and the rows per block, attention.cu's `BLOCK_ROWS<MT>`: MT tiles of 16 rows a warp.
fn tc_shape(gpu: &dyn Gpu, hs: usize) -> (&'static str, usize) {
    match (hs, gpu.attention_warp_rows()) {
        (64, WarpRows::ThirtyTwo) => ("", 2 * TC_ROWS),
        (64, WarpRows::Sixteen) => ("_rows16", TC_ROWS),
        _ => ("", TC_ROWS),
    }
}

/// Whether the shape runs on the tensor-core kernels (attention.cu's `attention_tc`).
fn tensor_cores(x: Precision, hs: usize) -> bool {
    x == Precision::Bf16 && (hs == 64 || hs == 128)
}

/// Whether `gpu` runs this pass, over `buffers`, on cuDNN: see [`AttentionKernels`]. cuDNN refuses a tensor that
/// does not start on 16 bytes, which the engine's kernels take (a slice of a larger buffer, say).
fn on_cudnn(gpu: &dyn Gpu, x: Precision, dropout: Option<Mask>, buffers: &[u64]) -> bool {
    x == Precision::Bf16
        && dropout.is_none()
        && gpu.attention_kernels() == AttentionKernels::Cudnn
        && buffers.iter().all(|addr| addr.is_multiple_of(16))
}

/// Dynamic shared memory of a tensor-core kernel with `rows` rows a block, laid out as attention.cu's `attention_tc`
/// says, in 64 x (hs + 8) bf16 tiles: the forward's K and V double-buffered (the block's Q passes through the second
/// buffer); in the backward the block's own two sides (Q and dO, or K and V), rows / 64 tiles each, then the other
/// side's double-buffered, and in the dK/dV kernel 2 x 2 x 64 floats (a query tile's lse and D_i,
/// double-buffered). At hs 64 (128 rows) / 128: forward 36 / 68 KiB, dQ kernel 72 / 102 KiB, dK/dV kernel 73 / 103
/// KiB; at hs 64 with 64 rows, 36, 54 and 55 KiB.
fn tc_shared_bytes(kernel: TcKernel, hs: usize, rows: usize) -> u32 {
    let tile = TC_ROWS * (hs + 8) * 2;
    let backward = (2 * rows / TC_ROWS + 4) * tile;
    let bytes = match kernel {
        TcKernel::Forward => 4 * tile,
        TcKernel::Query => backward,
        TcKernel::Key => backward + 4 * TC_COLS * 4,
    };
    bytes as u32
}

/// [`tc_shared_bytes`], checked to fit a block of `gpu`: at head size 128 the backward kernels' 102 and 103 KiB
/// exceed the 99 KiB of GPUs of compute capability 8.6, 8.9 and 12.0, where the driver's refusal would say only
/// "invalid value".
fn tc_shared_bytes_on(gpu: &dyn Gpu, kernel: TcKernel, hs: usize, rows: usize) -> Result<u32> {
    let bytes = tc_shared_bytes(kernel, hs, rows);
    let limit = gpu.max_shared_bytes();
    if bytes > limit {
        bail!(
            "bfloat16 attention at head size {hs} needs {} KiB of shared memory a block ({}), more than this GPU's {} KiB; choose n_head so that C / n_head is 64",
            bytes.div_ceil(1024),
            kernel.name(),
            limit / 1024
        );
    }
    Ok(bytes)
}

/// Launches tensor-core kernel `kernel` (`{name}_tc_hs{hs}{infix}_bf16`, see [`tc_shape`]) at head size `hs`: a
/// block per (rows of [`tc_shape`], b, h).
fn launch_tc(gpu: &dyn Gpu, kernel: TcKernel, hs: usize, b: usize, t: usize, n_head: usize, args: &[Arg]) -> Result<()> {
    let (infix, rows) = tc_shape(gpu, hs);
    let grid = [t.div_ceil(rows) as u32, (b * n_head) as u32, 1];
    gpu.launch(&format!("{}_tc_hs{hs}{infix}_bf16", kernel.name()), grid, BLOCK, tc_shared_bytes_on(gpu, kernel, hs, rows)?, args)
}

/// `out` (B, T, C) and `lse` (float, (B, NH, T), each query's log-sum-exp of its scaled scores,
/// kept for [`backward`]) from `qkv` (B, T, 3C): softmax(q kᵀ / sqrt(hs)) v per head, causal, with
/// `dropout` (the Attention site's mask) on the attention weights. Both outputs are written. cuDNN's lse
/// is the same quantity, so either side's forward feeds either side's backward.
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
    if on_cudnn(gpu, x, dropout, &[out, lse, qkv]) {
        return gpu.cudnn_attention(&CudnnCall::Forward { out, lse, qkv, b, t, c, n_head });
    }
    if tensor_cores(x, hs) {
        return launch_tc(gpu, TcKernel::Forward, hs, b, t, n_head, &args);
    }
    gpu.launch(&x.kernel(&format!("attention_forward_hs{hs}")), grid(true, b, t, n_head, hs), BLOCK, 0, &args)
}

/// `dqkv` (B, T, 3C), written in full, from `dout` (B, T, C), given the forward's `qkv`, `out`,
/// `lse` and the same `dropout` mask. `delta_scratch` is float (B, NH, T): the first kernel writes
/// each query's dout·out there (and dQ), the second reads it (and writes dK, dV); cuDNN keeps its own.
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
    if on_cudnn(gpu, x, dropout, &[dqkv, dout, qkv, out, lse]) {
        return gpu.cudnn_attention(&CudnnCall::Backward { dqkv, dout, qkv, out, lse, b, t, c, n_head });
    }
    let [stream, threshold, keep] = Arg::dropout(dropout);
    let (t_arg, c_arg, n_head_arg) = (Arg::I32(t as i32), Arg::I32(c as i32), Arg::I32(n_head as i32));
    let query = [
        Arg::Ptr(dqkv),
        Arg::Ptr(delta_scratch),
        Arg::Ptr(dout),
        Arg::Ptr(qkv),
        Arg::Ptr(out),
        Arg::Ptr(lse),
        t_arg,
        c_arg,
        n_head_arg,
        stream,
        threshold,
        keep,
    ];
    let key = [
        Arg::Ptr(dqkv),
        Arg::Ptr(dout),
        Arg::Ptr(qkv),
        Arg::Ptr(lse),
        Arg::Ptr(delta_scratch),
        t_arg,
        c_arg,
        n_head_arg,
        stream,
        threshold,
        keep,
    ];
    // The dQ kernel (which writes D_i), then the dK/dV kernel.
    if tensor_cores(x, hs) {
        launch_tc(gpu, TcKernel::Query, hs, b, t, n_head, &query)?;
        return launch_tc(gpu, TcKernel::Key, hs, b, t, n_head, &key);
    }
    let grid = grid(false, b, t, n_head, hs);
    gpu.launch(&x.kernel(&format!("attention_backward_query_hs{hs}")), grid, BLOCK, 0, &query)?;
    gpu.launch(&x.kernel(&format!("attention_backward_key_hs{hs}")), grid, BLOCK, 0, &key)
}
