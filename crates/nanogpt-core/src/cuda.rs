//! CUDA devices: opening one for training, and its memory figures. Without the `cuda` feature the
//! same functions exist and say that this build has no CUDA.

use candle_core::{Device, Result};
use serde::Serialize;

/// Device memory, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ts_rs::TS)]
pub struct MemoryStats {
    /// Held by tensors now, and the most held at once since the device was opened (the allocator
    /// pool's own counters: what PyTorch's `memory_allocated` / `max_memory_allocated` measure).
    pub in_use_bytes: u64,
    pub peak_bytes: u64,
    /// Free and total memory of the whole device, as `nvidia-smi` sees it (every process, and the
    /// pool's cached blocks counted as used).
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// The `ordinal`-th GPU, set up for training: TF32 matmuls for f32 (nanoGPT turns TF32 on for
/// every dtype), and freed memory kept in the allocator's pool instead of being returned to the
/// driver at every synchronisation (PyTorch's caching allocator does the same).
#[cfg(feature = "cuda")]
pub fn open(ordinal: usize, seed: u64) -> Result<Device> {
    use cudarc::driver::{result, sys};

    let device = Device::new_cuda(ordinal).map_err(|e| {
        candle_core::Error::Msg(format!("cannot open CUDA device {ordinal} ({}): is there an NVIDIA GPU, and its driver?", first_line(&e)))
    })?;
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    device.set_seed(seed)?;
    let pool = mem_pool(device.as_cuda_device()?)?;
    let mut keep_all = u64::MAX;
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep_all as *mut u64 as *mut std::ffi::c_void,
        )
    }
    .map_err(driver_error)?;
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
pub fn open(ordinal: usize, _seed: u64) -> Result<Device> {
    candle_core::bail!(
        "device `cuda:{ordinal}` needs the CUDA build of the engine, which this build is not (build it with `npm run build:cuda`); use --device=cpu"
    )
}

#[cfg(feature = "cuda")]
fn mem_pool(cuda: &candle_core::CudaDevice) -> Result<cudarc::driver::sys::CUmemoryPool> {
    let stream = cuda.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().map_err(driver_error)?;
    unsafe { cudarc::driver::result::device::get_mem_pool(context.cu_device()) }.map_err(driver_error)
}

#[cfg(feature = "cuda")]
fn driver_error(e: cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA driver: {e}"))
}

/// The message without the backtrace that candle appends when RUST_BACKTRACE is set.
#[cfg(feature = "cuda")]
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().trim().to_string()
}

/// Memory figures of `device`; None on the CPU.
#[cfg(feature = "cuda")]
pub fn memory_stats(device: &Device) -> Result<Option<MemoryStats>> {
    use cudarc::driver::{result, sys};
    let Device::Cuda(cuda) = device else { return Ok(None) };
    let pool = mem_pool(cuda)?;
    let attribute = |attr: sys::CUmemPool_attribute| -> Result<u64> {
        let mut value = 0u64;
        unsafe { result::mem_pool::get_attribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void) }.map_err(driver_error)?;
        Ok(value)
    };
    let (free, total) = result::mem_get_info().map_err(driver_error)?;
    Ok(Some(MemoryStats {
        in_use_bytes: attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        peak_bytes: attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        free_bytes: free as u64,
        total_bytes: total as u64,
    }))
}

#[cfg(not(feature = "cuda"))]
pub fn memory_stats(_device: &Device) -> Result<Option<MemoryStats>> {
    Ok(None)
}
