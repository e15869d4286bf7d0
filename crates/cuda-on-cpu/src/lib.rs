//! The engine's CUDA kernels (`nanogpt-core/src/kernels/cuda/kernels.cu`) compiled as C++ for the CPU,
//! and a launcher that runs them as the GPU would: every block of the grid in turn, each with one OS
//! thread per CUDA thread, so that `__syncthreads`, warp shuffles, shared memory and atomics keep their
//! meaning. It is slow (a thread per CUDA thread) and meant for kernel tests at small shapes.
//!
//! What it does not model: the GPU's memory (kernels get host addresses), warp lock-step beyond
//! the shuffles and `__syncwarp`, and the device's fast-math intrinsics (they compute exactly here).
//! Tensor-core products (PTX's `mma.sync` m16n8k16, bf16 operands, float accumulators) take and give
//! each lane the fragment elements PTX documents, so kernels that rely on the layout are tested too.
//! Asynchronous copies to shared memory (cp.async) land at either end of what a GPU allows
//! ([`CopyLanding`]), so that a missing wait or barrier around them shows.

use std::ffi::{c_char, c_int, c_void, CString};

extern "C" {
    fn cuda_on_cpu_launch(
        kernel: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: u32,
        params: *mut *mut c_void,
        n_params: usize,
        early_copies: bool,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// When an asynchronous copy to shared memory (cp.async) lands: one of the two ends of what a GPU allows, so
/// that running a kernel both ways exercises both orders a missing wait or barrier can break.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyLanding {
    /// At the barrier after the issuing thread's wait: a read that the wait and the barrier do not order
    /// after the copy finds what was there before.
    #[default]
    Late,
    /// As the copy is issued: one that overwrites a tile another warp may still be reading (no barrier
    /// between the reads and the copy) corrupts it, as on a GPU whose copy was quick.
    Early,
}

/// Runs `kernel` on a grid of `grid` blocks of `block` threads with `shared_bytes` of dynamic shared
/// memory per block, its arguments read through `params` as `cuLaunchKernel` reads its
/// `kernelParams`. Launches run one at a time, whichever thread makes them. Errors: an unknown
/// kernel, a wrong argument count, a block shape or shared memory size that a GPU would refuse.
///
/// # Safety
/// Each `params[i]` must point to a value of the kernel's i-th parameter type, and every buffer
/// address among them must be valid for what the kernel reads and writes.
pub unsafe fn launch(kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, params: &mut [*mut c_void]) -> Result<(), String> {
    launch_landing(kernel, grid, block, shared_bytes, params, CopyLanding::Late)
}

/// [`launch`], with its asynchronous copies landing as `landing` says.
///
/// # Safety
/// As for [`launch`].
pub unsafe fn launch_landing(
    kernel: &str,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    params: &mut [*mut c_void],
    landing: CopyLanding,
) -> Result<(), String> {
    let name = CString::new(kernel).map_err(|_| format!("kernel name {kernel:?} contains a NUL byte"))?;
    let mut error = vec![0u8; 512];
    let rc = cuda_on_cpu_launch(
        name.as_ptr(),
        grid.as_ptr(),
        block.as_ptr(),
        shared_bytes,
        params.as_mut_ptr(),
        params.len(),
        landing == CopyLanding::Early,
        error.as_mut_ptr() as *mut c_char,
        error.len(),
    );
    if rc == 0 {
        return Ok(());
    }
    let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
    Err(String::from_utf8_lossy(&error[..end]).into_owned())
}
