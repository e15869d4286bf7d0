//! The training step's CUDA kernels: each `.cu` file here is one layer kind's forward and backward
//! kernels (all compiled together through `kernels.cu`), and its sibling `.rs` file launches them:
//! it picks the grid and block shape and passes the arguments in the kernel's order. They launch on
//! any [`Gpu`]: a CUDA device in the `cuda` build, or the crate `cuda-on-cpu`, which runs the same
//! sources on CPU threads so that their tests run where there is no GPU.
//!
//! The conventions every kernel follows are at the top of `common.cuh`.

pub mod adamw;
pub mod attention;
pub mod bias;
pub mod classifier;
pub mod decode;
pub mod encoder;
pub mod gelu;
pub mod layernorm;
pub mod matmul;

use std::sync::Arc;

use candle_core::{bail, Result};

use super::dropout::Mask;

/// The type of activations and of the weights' compute copy (`X` in the kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

impl Precision {
    /// The kernel instantiated for this precision: `name_f32` or `name_bf16`.
    pub fn kernel(self, name: &str) -> String {
        match self {
            Precision::F32 => format!("{name}_f32"),
            Precision::Bf16 => format!("{name}_bf16"),
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

/// One kernel argument, of the C type the kernel's signature declares. Buffers are device
/// addresses (host addresses on `cuda-on-cpu`); 0 is a null pointer (an absent bias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl Arg {
    /// The three arguments (stream, threshold, keep scale) through which kernels draw `mask`'s
    /// decisions (`dropout_scale` in common.cuh); no mask keeps every element.
    pub fn dropout(mask: Option<Mask>) -> [Arg; 3] {
        match mask {
            Some(mask) => {
                assert_eq!(mask.base, 0, "a CUDA kernel applies a dropout mask from its site's first element");
                [Arg::U64(mask.stream), Arg::U32(mask.threshold), Arg::F32(mask.keep_scale)]
            }
            None => [Arg::U64(0), Arg::U32(0), Arg::F32(1.0)],
        }
    }

    /// Pointers to each argument's value, in order: the `kernelParams` array that `cuLaunchKernel`
    /// (and `cuda-on-cpu`) reads the arguments through. They point into `args`, so they live as long as it.
    pub fn kernel_params(args: &mut [Arg]) -> Vec<*mut std::ffi::c_void> {
        args.iter_mut()
            .map(|arg| match arg {
                Arg::Ptr(v) | Arg::U64(v) => v as *mut u64 as *mut _,
                Arg::I64(v) => v as *mut i64 as *mut _,
                Arg::I32(v) => v as *mut i32 as *mut _,
                Arg::U32(v) => v as *mut u32 as *mut _,
                Arg::F32(v) => v as *mut f32 as *mut _,
            })
            .collect()
    }
}

/// Where kernels run, and the memory they run on. Work is queued in order on one stream: a launch,
/// product, `zero` or `free` may return before it has run; `upload` and `download` return once their copy
/// is done.
pub trait Gpu {
    /// Launches the kernel named `kernel` (with its precision suffix) on a grid of `grid` blocks of
    /// `block` threads, with `shared_bytes` of dynamic shared memory per block.
    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()>;

    /// A new buffer of `bytes` bytes, zero-filled, aligned for any element type; 0 bytes is the null
    /// address 0, which `free` accepts.
    fn alloc(&self, bytes: usize) -> Result<u64>;

    /// Releases a buffer from `alloc` once the work queued before has finished with it.
    fn free(&self, addr: u64) -> Result<()>;

    /// Copies `src` to `dst`, after the work queued before; returns once `src` has been read.
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;

    /// Copies `dst.len()` bytes from `src` once the work queued before has finished: it synchronises.
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;

    /// Sets `bytes` bytes from `dst` to zero, queued.
    fn zero(&self, dst: u64, bytes: usize) -> Result<()>;

    /// The matrix product `g` describes, queued.
    fn gemm(&self, g: &Gemm) -> Result<()>;

    /// The most dynamic shared memory a block may ask for (the device's opt-in limit per block).
    fn max_shared_bytes(&self) -> u32;

    /// Rows a warp of the tensor-core attention kernels owns at head size 64: see [`attention::WarpRows`].
    fn attention_warp_rows(&self) -> attention::WarpRows {
        attention::WarpRows::default()
    }

    /// Whose kernels run attention in bf16 without dropout: see [`attention::AttentionKernels`].
    fn attention_kernels(&self) -> attention::AttentionKernels {
        attention::AttentionKernels::default()
    }

    /// Queues `call` on cuDNN's fused attention kernels, which only a CUDA device has.
    fn cudnn_attention(&self, call: &attention::CudnnCall) -> Result<()> {
        bail!("cuDNN attention ({call:?}) runs on a CUDA device only; leave NANOGPT_CUDA_ATTENTION unset here")
    }
}

/// Row-major `C` (m x n) = alpha op(A) op(B) + beta C + bias, op(A) m x k and op(B) k x n, every matrix
/// packed (rows contiguous): A is stored m x k, or k x m when `transpose_a`; B k x n, or n x k when
/// `transpose_b`. A and B hold `inputs`, C and the bias (n values, added to every row) hold `output`; products
/// accumulate in f32 (TF32 tensor cores for f32 inputs on a CUDA device, as nanoGPT allows), and the bias is
/// added to that sum before its one rounding to `output`. With beta 0, C is written without being read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub transpose_a: bool,
    pub b: u64,
    pub transpose_b: bool,
    pub c: u64,
    pub inputs: Precision,
    pub output: Precision,
    pub alpha: f32,
    pub beta: f32,
    pub bias: Option<u64>,
}

impl Gemm {
    /// Refuses what cuBLAS cannot do, on every [`Gpu`] alike: empty or over-large dimensions, and f32
    /// inputs with a bf16 output (no cublasGemmEx type combination has them).
    pub fn check(&self) -> Result<()> {
        let Gemm { m, n, k, .. } = *self;
        if [m, n, k].iter().any(|&d| d == 0 || d > i32::MAX as usize) {
            bail!("gemm: shape m={m}, n={n}, k={k} has an empty dimension or one over 2^31 - 1");
        }
        if self.inputs == Precision::F32 && self.output == Precision::Bf16 {
            bail!("gemm: f32 inputs with a bf16 output is not a cuBLAS combination; use bf16 inputs or an f32 output");
        }
        Ok(())
    }

    /// The same product as column-major BLAS (cuBLAS) takes it. A packed row-major matrix is, read
    /// column-major, its transpose; so C is computed as Cᵀ (n x m) = op(B)ᵀ op(A)ᵀ, with B in BLAS's A place
    /// and A in its B place. A matrix stored untransposed is then used as stored, a transposed one transposed
    /// back, and each leading dimension is the stored row length.
    pub fn column_major(&self) -> ColumnMajorGemm {
        ColumnMajorGemm {
            transpose_a: self.transpose_b,
            transpose_b: self.transpose_a,
            m: self.n,
            n: self.m,
            k: self.k,
            a: self.b,
            lda: if self.transpose_b { self.k } else { self.n },
            b: self.a,
            ldb: if self.transpose_a { self.m } else { self.k },
            c: self.c,
            ldc: self.n,
        }
    }
}

/// A product in BLAS's column-major terms (the arguments of `cublasGemmEx`): C (m x n, leading dimension
/// ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n; element (i, j) of a matrix X with leading
/// dimension ldx is at X[i + j ldx].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    pub transpose_a: bool,
    pub transpose_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub c: u64,
    pub ldc: usize,
}

/// A buffer on a [`Gpu`], freed when dropped.
pub struct DeviceBuffer {
    gpu: Arc<dyn Gpu + Send + Sync>,
    pub addr: u64,
    pub bytes: usize,
}

impl DeviceBuffer {
    pub fn zeroed(gpu: &Arc<dyn Gpu + Send + Sync>, bytes: usize) -> Result<Self> {
        Ok(Self { gpu: gpu.clone(), addr: gpu.alloc(bytes)?, bytes })
    }

    /// Writes `src` to the buffer's first bytes.
    pub fn upload_bytes(&self, src: &[u8]) -> Result<()> {
        if src.len() > self.bytes {
            bail!("upload: {} bytes do not fit a buffer of {} bytes; allocate a larger one", src.len(), self.bytes);
        }
        self.gpu.upload(self.addr, src)
    }

    /// The whole buffer, once the work queued before has finished.
    pub fn download_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.bytes];
        self.gpu.download(self.addr, &mut bytes)?;
        Ok(bytes)
    }

    pub fn upload_f32(&self, values: &[f32]) -> Result<()> {
        self.upload_bytes(&values.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>())
    }

    pub fn download_f32(&self) -> Result<Vec<f32>> {
        Ok(self.download_bytes()?.chunks_exact(4).map(|b| f32::from_ne_bytes(b.try_into().unwrap())).collect())
    }

    pub fn upload_i32(&self, values: &[i32]) -> Result<()> {
        self.upload_bytes(&values.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>())
    }

    pub fn download_i32(&self) -> Result<Vec<i32>> {
        Ok(self.download_bytes()?.chunks_exact(4).map(|b| i32::from_ne_bytes(b.try_into().unwrap())).collect())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // A free that fails leaves the memory to the process's end; a destructor cannot report it.
        let _ = self.gpu.free(self.addr);
    }
}

/// Blocks of `block` threads to cover `n` items, one per thread.
pub fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize) as u32
}

/// Checks that the fused step has kernels for `args` in precision `x` on `gpu` (a head size with attention kernels
/// whose shared memory fits the GPU, LayerNorm's channels), so that a shape without them stops at set-up rather than
/// at the first step, with the way out: candle's graph runs any shape.
pub fn check_model(gpu: &dyn Gpu, args: &crate::model::ModelArgs, x: Precision) -> Result<()> {
    attention::check_model(gpu, x, args.n_embd, args.n_head, args.dropout > 0.0)
        .and_then(|()| layernorm::check_channels(args.n_embd))
        .map_err(|e| with_fix(&e, "or train on candle's graph instead: NANOGPT_CUDA_STEP=graph"))
}

/// An error's message without the backtrace candle appends to it when RUST_BACKTRACE is set.
pub(crate) fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().trim().to_string()
}

/// `e`'s message followed by another way out, in one line.
pub(crate) fn with_fix(e: &candle_core::Error, fix: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}; {fix}", first_line(e)))
}
