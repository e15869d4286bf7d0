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
pub mod encoder;
pub mod gelu;
pub mod layernorm;

use candle_core::Result;

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

/// Where kernels run.
pub trait Gpu {
    /// Launches the kernel named `kernel` (with its precision suffix) on a grid of `grid` blocks of
    /// `block` threads, with `shared_bytes` of dynamic shared memory per block.
    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()>;
}

/// Blocks of `block` threads to cover `n` items, one per thread.
pub fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize) as u32
}
