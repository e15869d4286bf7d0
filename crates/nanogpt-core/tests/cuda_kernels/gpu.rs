//! The emulated GPU the kernel tests launch on, and helpers for their buffers.

use candle_core::Result;
use half::bf16;
use nanogpt_core::kernels::cuda::{Arg, Gpu};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `cuda-on-cpu` as a [`Gpu`]: buffers are host memory, addressed as the kernels would address device memory.
pub struct Emulated;

impl Gpu for Emulated {
    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()> {
        let mut args = args.to_vec();
        let mut params = Arg::kernel_params(&mut args);
        // SAFETY: the launch functions of kernels/cuda pass arguments of the types the kernel declares,
        // and the tests pass addresses of live buffers of the sizes the kernel reads and writes.
        unsafe { cuda_on_cpu::launch(kernel, grid, block, shared_bytes, &mut params) }.map_err(candle_core::Error::Msg)
    }
}

/// The address a kernel sees for `buffer`.
pub fn addr<T>(buffer: &[T]) -> u64 {
    buffer.as_ptr() as u64
}

/// Uniform values in [-scale, scale).
pub fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

pub fn from_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// Asserts |got - want| <= tol * (1 + |want|) element-wise, naming the first element that is not.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w} (tolerance {tol})");
    }
}
