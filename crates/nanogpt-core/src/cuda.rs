//! CUDA devices: opening one for training, its memory figures, and the engine's own kernels on it.
//! Without the `cuda` feature the same functions exist and say that this build has no CUDA.

#[cfg(feature = "cuda")]
use crate::kernels::cuda::first_line;
use candle_core::{Device, Result};
#[cfg(feature = "cuda")]
use cudarc::driver;
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
    let context = device.as_cuda_device()?.cuda_stream().context().clone();
    let (major, minor) = context.compute_capability().map_err(driver_error)?;
    let built: u32 = env!("NANOGPT_CUDA_COMPUTE_CAP").parse().expect("build.rs sets a number");
    if let Some(problem) = capability_problem(ordinal, &context.name().unwrap_or_default(), (major * 10 + minor) as u32, built) {
        candle_core::bail!("{problem}");
    }
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

/// Why GPU `ordinal` (`name`, compute capability `device` as 10 * major + minor) cannot run this build, whose
/// kernels target `built` (its CUDA_COMPUTE_CAP); None if it can. The driver compiles PTX for the GPU it
/// runs on when that is the same architecture or newer, never older, and would otherwise fail at the first
/// launch with a bare "no binary for GPU".
#[cfg(any(feature = "cuda", test))]
fn capability_problem(ordinal: usize, name: &str, device: u32, built: u32) -> Option<String> {
    let version = |cap: u32| format!("{}.{}", cap / 10, cap % 10);
    if device < 80 {
        Some(format!(
            "GPU {ordinal} ({name}) has compute capability {}, and the CUDA engine needs 8.0 or newer (bfloat16 tensor cores: A100, RTX 30xx and later); use --device=cpu",
            version(device)
        ))
    } else if device < built {
        Some(format!(
            "GPU {ordinal} ({name}) has compute capability {}, older than the {} this CUDA build was compiled for; rebuild it for this GPU with `CUDA_COMPUTE_CAP={device} npm run build:cuda`",
            version(device),
            version(built)
        ))
    } else {
        None
    }
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

/// The engine's CUDA kernels (kernels/cuda, compiled to one PTX module by build.rs) on a CUDA device's
/// stream: the [`Gpu`](crate::kernels::cuda::Gpu) of the `cuda` build.
#[cfg(feature = "cuda")]
pub struct Kernels {
    device: candle_core::CudaDevice,
    functions: std::sync::Mutex<std::collections::HashMap<String, cudarc::driver::CudaFunction>>,
    staging: std::sync::Mutex<Staging>,
    /// While profiling: each launch and product queued, by name, between the two events queued around it.
    profile: std::sync::Mutex<Option<Vec<(String, driver::CudaEvent, driver::CudaEvent)>>>,
    /// cuBLASLt, made at the first product with a bias.
    blas_lt: std::sync::Mutex<Option<BlasLt>>,
    /// Set by `NANOGPT_CUDA_BIAS_EPILOGUE=0`: every product with a bias adds it with bias.cu's kernel, not in
    /// cuBLASLt's epilogue (to compare the two).
    bias_epilogue_off: Option<String>,
    /// Why the last product with a bias added it with bias.cu's kernel: see `take_bias_fallback`.
    bias_fallback: std::sync::Mutex<Option<String>>,
    /// The attention kernels' shape at head size 64, from `NANOGPT_CUDA_ATTENTION_WARP_ROWS`.
    attention_warp_rows: crate::kernels::cuda::attention::WarpRows,
    /// Whose kernels run attention in bf16 without dropout, from `NANOGPT_CUDA_ATTENTION`.
    attention_kernels: crate::kernels::cuda::attention::AttentionKernels,
    /// cuDNN, opened at its first use (at `new` when `attention_kernels` asks for it).
    cudnn: std::sync::Mutex<Option<crate::cudnn::Cudnn>>,
    /// The device's opt-in limit of dynamic shared memory per block.
    max_shared_bytes: u32,
}

/// A cuBLASLt handle and the workspace its kernels may use: 32 MiB, NVIDIA's figure for Hopper (cudarc's own
/// cuBLASLt wrapper allocates the same), from the device's pool.
#[cfg(feature = "cuda")]
struct BlasLt {
    handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    workspace: u64,
    stream: std::sync::Arc<driver::CudaStream>,
}

#[cfg(feature = "cuda")]
const BLAS_LT_WORKSPACE: usize = 32 << 20;

// SAFETY: a cuBLASLt handle is not tied to the thread that made it; `Kernels` uses it under its mutex only.
#[cfg(feature = "cuda")]
unsafe impl Send for BlasLt {}

#[cfg(feature = "cuda")]
impl Drop for BlasLt {
    fn drop(&mut self) {
        // Failures leave the handle or the memory to the process's end; a destructor cannot report them.
        // SAFETY: the workspace came from this stream's pool; the work queued before still sees it.
        unsafe {
            let _ = cudarc::cublaslt::result::destroy_handle(self.handle);
            let _ = driver::result::free_async(self.workspace, self.stream.cu_stream());
        }
    }
}

/// The device time of one kernel (or one shape of product) over a profile: see [`Kernels::start_profile`].
#[cfg(feature = "cuda")]
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelTime {
    pub name: String,
    pub launches: usize,
    pub ms: f64,
}

/// Page-locked host buffers that small uploads (a batch's tokens and targets) pass through: a copy from
/// pageable memory may wait for the GPU to finish all queued work, one from pinned memory is only queued.
/// Each buffer is written again once its last copy has run (cudarc records an event per buffer), so the
/// host may run up to `STAGING_BUFFERS / 2` micro-steps ahead of the GPU.
#[cfg(feature = "cuda")]
#[derive(Default)]
struct Staging {
    buffers: Vec<driver::PinnedHostSlice<u8>>,
    next: usize,
}

#[cfg(feature = "cuda")]
const STAGING_BUFFERS: usize = 4;

/// Uploads larger than this (weights, gradients) go from pageable memory and are waited for.
#[cfg(feature = "cuda")]
const STAGED_UPLOAD_MAX: usize = 16 << 20;

#[cfg(feature = "cuda")]
impl Kernels {
    const PTX: &'static str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));

    pub fn new(device: &Device) -> Result<Self> {
        let device = device.as_cuda_device()?.clone();
        let max_shared_bytes = device
            .cuda_stream()
            .context()
            .attribute(driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver_error)? as u32;
        let kernels = Self {
            device,
            functions: Default::default(),
            staging: Default::default(),
            profile: Default::default(),
            blas_lt: Default::default(),
            bias_epilogue_off: match std::env::var("NANOGPT_CUDA_BIAS_EPILOGUE").as_deref() {
                Ok("0") => Some("NANOGPT_CUDA_BIAS_EPILOGUE=0".to_string()),
                Ok("1") | Err(_) => None,
                Ok(other) => candle_core::bail!("NANOGPT_CUDA_BIAS_EPILOGUE must be 0 or 1, got `{other}`"),
            },
            bias_fallback: Default::default(),
            attention_warp_rows: crate::kernels::cuda::attention::WarpRows::from_env()?,
            attention_kernels: crate::kernels::cuda::attention::AttentionKernels::from_env()?,
            cudnn: Default::default(),
            max_shared_bytes,
        };
        // Where cuDNN was asked for, a machine without it stops here, before any work.
        if kernels.attention_kernels == crate::kernels::cuda::attention::AttentionKernels::Cudnn {
            kernels.with_cudnn(|_| Ok(()))?;
        }
        Ok(kernels)
    }

    /// Runs `f` on cuDNN, opened on the device's stream at the first call.
    fn with_cudnn(&self, f: impl FnOnce(&mut crate::cudnn::Cudnn) -> Result<()>) -> Result<()> {
        let stream = self.stream()?;
        let mut cudnn = self.cudnn.lock().unwrap();
        if cudnn.is_none() {
            *cudnn = Some(crate::cudnn::Cudnn::open(stream)?);
        }
        f(cudnn.as_mut().unwrap())
    }

    /// Why the last product with a bias since the previous call added it with a kernel of its own rather than
    /// in cuBLASLt's epilogue; None if every one of them used the epilogue.
    pub fn take_bias_fallback(&self) -> Option<String> {
        self.bias_fallback.lock().unwrap().take()
    }

    /// Starts timing every kernel launch and matrix product by the device's clock: two events are queued
    /// around each, so nothing waits for the device, but creating them costs host time, and a profiled step
    /// runs slower than an unprofiled one wherever the host is what the device waits for.
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap() = Some(Vec::new());
    }

    /// Ends the profile: the device time of each kernel name (products as `gemm MxNxK` with their
    /// transposes) summed over its launches, in the order of their first launch. Waits for the device.
    pub fn take_profile(&self) -> Result<Vec<KernelTime>> {
        let records = self.profile.lock().unwrap().take().unwrap_or_default();
        let mut times: Vec<KernelTime> = Vec::new();
        for (name, start, end) in records {
            let ms = start.elapsed_ms(&end).map_err(driver_error)? as f64;
            match times.iter_mut().find(|t| t.name == name) {
                Some(t) => {
                    t.launches += 1;
                    t.ms += ms;
                }
                None => times.push(KernelTime { name, launches: 1, ms }),
            }
        }
        Ok(times)
    }

    /// Queues `work`, between two timing events when profiling.
    fn timed(&self, name: impl FnOnce() -> String, work: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut profile = self.profile.lock().unwrap();
        let Some(records) = profile.as_mut() else {
            drop(profile);
            return work();
        };
        let stream = self.stream()?;
        let timing = Some(driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timing).map_err(driver_error)?;
        work()?;
        let end = stream.record_event(timing).map_err(driver_error)?;
        records.push((name(), start, end));
        Ok(())
    }

    pub fn device(&self) -> &candle_core::CudaDevice {
        &self.device
    }

    /// The device's stream, with its context current on this thread (the driver calls act on that context).
    fn stream(&self) -> Result<std::sync::Arc<driver::CudaStream>> {
        let stream = self.device.cuda_stream();
        stream.context().bind_to_thread().map_err(driver_error)?;
        Ok(stream)
    }

    /// The kernel's function handle, loaded once; kernels asking for more than the default 48 KiB of
    /// dynamic shared memory are allowed the most they have asked for so far.
    fn function(&self, name: &str, shared_bytes: u32) -> Result<cudarc::driver::CudaFunction> {
        use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let mut functions = self.functions.lock().unwrap();
        let function = match functions.get(name) {
            Some(f) => f.clone(),
            None => {
                let f = (*self.device.get_or_load_custom_func(name, "nanogpt_kernels", Self::PTX)?).clone();
                functions.insert(name.to_string(), f.clone());
                f
            }
        };
        if shared_bytes > 48 * 1024 {
            function.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes as i32).map_err(driver_error)?;
        }
        Ok(function)
    }
}

#[cfg(feature = "cuda")]
impl crate::kernels::cuda::Gpu for Kernels {
    fn max_shared_bytes(&self) -> u32 {
        self.max_shared_bytes
    }

    fn attention_warp_rows(&self) -> crate::kernels::cuda::attention::WarpRows {
        self.attention_warp_rows
    }

    fn attention_kernels(&self) -> crate::kernels::cuda::attention::AttentionKernels {
        self.attention_kernels
    }

    fn cudnn_attention(&self, call: &crate::kernels::cuda::attention::CudnnCall) -> Result<()> {
        let name = match call {
            crate::kernels::cuda::attention::CudnnCall::Forward { .. } => "attention_forward_cudnn",
            crate::kernels::cuda::attention::CudnnCall::Backward { .. } => "attention_backward_cudnn",
        };
        self.with_cudnn(|cudnn| self.timed(|| name.to_string(), || cudnn.run(call)))
    }

    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[crate::kernels::cuda::Arg]) -> Result<()> {
        let function = self.function(kernel, shared_bytes)?;
        let mut args = args.to_vec();
        let mut params = crate::kernels::cuda::Arg::kernel_params(&mut args);
        let stream = self.stream()?;
        self.timed(
            || kernel.to_string(),
            || {
                // SAFETY: the launch functions of kernels/cuda pass the arguments the kernel declares, in its
                // order; cuLaunchKernel copies them before returning, while `args` is alive.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        function.cu_function(),
                        (grid[0], grid[1], grid[2]),
                        (block[0], block[1], block[2]),
                        shared_bytes,
                        stream.cu_stream(),
                        &mut params,
                    )
                }
                .map_err(|e| candle_core::Error::Msg(format!("launching CUDA kernel {kernel}: {e}")))
            },
        )
    }

    // Memory comes from the device's stream-ordered pool (the one `open` keeps freed memory in), and is
    // allocated, cleared and freed in the stream's order, so none of it waits for the device.
    fn alloc(&self, bytes: usize) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        let stream = self.stream()?;
        // SAFETY: the allocation is `bytes` long; the memset covers it, queued after the allocation.
        unsafe {
            let addr = driver::result::malloc_async(stream.cu_stream(), bytes)
                .map_err(|e| candle_core::Error::Msg(format!("allocating {bytes} bytes on the GPU: {e}")))?;
            driver::result::memset_d8_async(addr, 0, bytes, stream.cu_stream()).map_err(driver_error)?;
            Ok(addr)
        }
    }

    fn free(&self, addr: u64) -> Result<()> {
        if addr == 0 {
            return Ok(());
        }
        let stream = self.stream()?;
        // SAFETY: `addr` came from `alloc`, whose callers free it once; work queued before still sees it.
        unsafe { driver::result::free_async(addr, stream.cu_stream()) }.map_err(driver_error)
    }

    // A small upload is copied into a pinned staging buffer and queued; a large one is queued from `src`
    // itself and waited for, since `src` is the caller's to reuse once this returns.
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        use driver::HostSlice;
        if src.is_empty() {
            return Ok(());
        }
        let stream = self.stream()?;
        if src.len() > STAGED_UPLOAD_MAX {
            // SAFETY: the caller's `dst` holds `src.len()` bytes; `src` outlives the copy (synchronised below).
            unsafe { driver::result::memcpy_htod_async(dst, src, stream.cu_stream()) }.map_err(driver_error)?;
            return stream.synchronize().map_err(driver_error);
        }
        let mut staging = self.staging.lock().unwrap();
        let slot = staging.next;
        staging.next = (slot + 1) % STAGING_BUFFERS;
        if staging.buffers.len() <= slot || staging.buffers[slot].len() < src.len() {
            // SAFETY: the buffer is written below before any copy reads it.
            let buffer = unsafe { stream.context().alloc_pinned::<u8>(src.len().next_power_of_two()) }.map_err(driver_error)?;
            match staging.buffers.get_mut(slot) {
                Some(old) => *old = buffer,
                None => staging.buffers.push(buffer),
            }
        }
        let buffer = &mut staging.buffers[slot];
        // Waits for this buffer's previous copy, then fills it.
        buffer.as_mut_slice().map_err(driver_error)?[..src.len()].copy_from_slice(src);
        // SAFETY: the slice is used on `stream` only; the guard records the buffer's event after the copy is
        // queued, so that the next write waits for it. `dst` holds `src.len()` bytes (the caller's promise).
        unsafe {
            let (staged, _record_on_drop) = buffer.stream_synced_slice(&stream);
            driver::result::memcpy_htod_async(dst, &staged[..src.len()], stream.cu_stream()).map_err(driver_error)
        }
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let stream = self.stream()?;
        // SAFETY: the caller's `src` holds `dst.len()` bytes; `dst` outlives the copy (synchronised below).
        unsafe { driver::result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.map_err(driver_error)?;
        stream.synchronize().map_err(driver_error)
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let stream = self.stream()?;
        // SAFETY: the caller's `dst` holds `bytes` bytes.
        unsafe { driver::result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }.map_err(driver_error)
    }

    // A bias goes into cuBLASLt's epilogue, which adds it before the output's one rounding, with no pass of its
    // own over the output; where cuBLASLt refuses the product (or NANOGPT_CUDA_BIAS_EPILOGUE=0), cuBLAS computes
    // it and bias.cu's kernel adds the bias, and `take_bias_fallback` says why.
    fn gemm(&self, g: &crate::kernels::cuda::Gemm) -> Result<()> {
        g.check()?;
        let Some(bias) = g.bias else {
            return self.timed(|| gemm_name(g, ""), || self.gemm_blas(g));
        };
        let fused = match &self.bias_epilogue_off {
            Some(reason) => Err(reason.clone()),
            None => self.timed(|| gemm_name(g, " +bias"), || self.gemm_blas_lt(g, bias)).map_err(|e| first_line(&e)),
        };
        if let Err(reason) = fused {
            *self.bias_fallback.lock().unwrap() = Some(reason);
            let product = crate::kernels::cuda::Gemm { bias: None, ..*g };
            self.timed(|| gemm_name(&product, ""), || self.gemm_blas(&product))?;
            crate::kernels::cuda::bias::add(self, g.output, g.c, bias, g.m, g.n)?;
        }
        Ok(())
    }
}

/// A product's name in a profile: its shape, transposes and types.
#[cfg(feature = "cuda")]
fn gemm_name(g: &crate::kernels::cuda::Gemm, epilogue: &str) -> String {
    let transposed = |t: bool| if t { "^T" } else { "" };
    format!(
        "gemm {}x{}x{} a{} b{} {:?}->{:?}{epilogue}",
        g.m,
        g.n,
        g.k,
        transposed(g.transpose_a),
        transposed(g.transpose_b),
        g.inputs,
        g.output
    )
}

#[cfg(feature = "cuda")]
fn cublas_data_type(p: crate::kernels::cuda::Precision) -> cudarc::cublas::sys::cudaDataType_t {
    match p {
        crate::kernels::cuda::Precision::F32 => cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F,
        crate::kernels::cuda::Precision::Bf16 => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// The products' compute type: TF32 tensor cores for f32 inputs, as nanoGPT allows; f32 sums for bf16.
#[cfg(feature = "cuda")]
fn cublas_compute_type(inputs: crate::kernels::cuda::Precision) -> cudarc::cublas::sys::cublasComputeType_t {
    match inputs {
        crate::kernels::cuda::Precision::F32 => cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        crate::kernels::cuda::Precision::Bf16 => cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    }
}

/// Destroys a cuBLASLt descriptor when dropped.
#[cfg(feature = "cuda")]
struct LtDescriptor<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), cudarc::cublaslt::result::CublasError>);

#[cfg(feature = "cuda")]
impl<T: Copy> Drop for LtDescriptor<T> {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created once and is destroyed once, after its last use.
        let _ = unsafe { (self.1)(self.0) };
    }
}

#[cfg(feature = "cuda")]
impl Kernels {
    /// `g` through cublasGemmEx, column-major as `Gemm::column_major` restates it; `g` has no bias.
    fn gemm_blas(&self, g: &crate::kernels::cuda::Gemm) -> Result<()> {
        use cudarc::cublas::sys::{cublasGemmAlgo_t, cublasOperation_t};

        let op = |transposed: bool| if transposed { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cm = g.column_major();
        // `check` bounded m, n and k by i32::MAX, and every leading dimension is one of them.
        let int = |d: usize| d as i32;
        // cuBLAS runs in the context current on the calling thread.
        self.stream()?;
        let blas = self.device.cublas_handle();
        // SAFETY: the handle is bound to the device's stream; the caller's a, b and c hold the packed
        // matrices `g` describes; alpha and beta are host f32s, read before the call returns, as cuBLAS's
        // default host pointer mode and its 32F compute types expect.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                op(cm.transpose_a),
                op(cm.transpose_b),
                int(cm.m),
                int(cm.n),
                int(cm.k),
                &g.alpha as *const f32 as *const _,
                cm.a as *const _,
                cublas_data_type(g.inputs),
                int(cm.lda),
                cm.b as *const _,
                cublas_data_type(g.inputs),
                int(cm.ldb),
                &g.beta as *const f32 as *const _,
                cm.c as *mut _,
                cublas_data_type(g.output),
                int(cm.ldc),
                cublas_compute_type(g.inputs),
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS gemm m={} n={} k={}: {e}", g.m, g.n, g.k)))
    }

    /// `g` through cublasLtMatmul with the bias epilogue, column-major as for `gemm_blas`: there the bias has
    /// one value per row of C (column-major m), which is what cuBLASLt's epilogue broadcasts.
    fn gemm_blas_lt(&self, g: &crate::kernels::cuda::Gemm, bias: u64) -> Result<()> {
        use cudarc::cublas::sys::cublasOperation_t;
        use cudarc::cublaslt::result as lt;
        use cudarc::cublaslt::sys::{
            cublasLtEpilogue_t, cublasLtMatmulDescAttributes_t as Desc, cublasLtMatmulPreferenceAttributes_t as Pref, cudaDataType_t,
        };
        // The epilogue may read the bias with vector loads, and no preference states its alignment: a bias that
        // does not start on 16 bytes (a model whose widths are not multiples of 8) goes to bias.cu's kernel.
        if !bias.is_multiple_of(16) {
            candle_core::bail!("the bias at {bias:#x} does not start on 16 bytes");
        }

        let failed =
            |what: &str, e: lt::CublasError| candle_core::Error::Msg(format!("cuBLASLt {what} m={} n={} k={}: {e}", g.m, g.n, g.k));
        let data_type = |p: crate::kernels::cuda::Precision| match p {
            crate::kernels::cuda::Precision::F32 => cudaDataType_t::CUDA_R_32F,
            crate::kernels::cuda::Precision::Bf16 => cudaDataType_t::CUDA_R_16BF,
        };
        // The same enumerators as cuBLAS's, in cuBLASLt's own bindings.
        let compute = match g.inputs {
            crate::kernels::cuda::Precision::F32 => cudarc::cublaslt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            crate::kernels::cuda::Precision::Bf16 => cudarc::cublaslt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let cm = g.column_major();
        let stream = self.stream()?;
        let mut blas_lt = self.blas_lt.lock().unwrap();
        if blas_lt.is_none() {
            let handle = lt::create_handle().map_err(|e| failed("handle", e))?;
            // SAFETY: a fresh allocation of the stated size on the device's stream.
            let workspace = unsafe { driver::result::malloc_async(stream.cu_stream(), BLAS_LT_WORKSPACE) }.map_err(driver_error)?;
            *blas_lt = Some(BlasLt { handle, workspace, stream: stream.clone() });
        }
        let BlasLt { handle, workspace, .. } = blas_lt.as_ref().unwrap();

        // Matrices as BLAS stores them: rows x columns with a leading dimension, transposed ones as stored.
        let layout = |p, rows: usize, cols: usize, ld: usize| -> Result<LtDescriptor<_>> {
            let layout = lt::create_matrix_layout(data_type(p), rows as u64, cols as u64, ld as i64).map_err(|e| failed("layout", e))?;
            Ok(LtDescriptor(layout, lt::destroy_matrix_layout))
        };
        let (a_rows, a_cols) = if cm.transpose_a { (cm.k, cm.m) } else { (cm.m, cm.k) };
        let (b_rows, b_cols) = if cm.transpose_b { (cm.n, cm.k) } else { (cm.k, cm.n) };
        let a_layout = layout(g.inputs, a_rows, a_cols, cm.lda)?;
        let b_layout = layout(g.inputs, b_rows, b_cols, cm.ldb)?;
        let c_layout = layout(g.output, cm.m, cm.n, cm.ldc)?;

        let desc = LtDescriptor(
            lt::create_matmul_desc(compute, cudaDataType_t::CUDA_R_32F).map_err(|e| failed("descriptor", e))?,
            lt::destroy_matmul_desc,
        );
        let op = |transposed: bool| if transposed { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (op_a, op_b, epilogue) = (op(cm.transpose_a), op(cm.transpose_b), cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS);
        // SAFETY: each value is of the type and size its attribute takes, and is read before the call returns;
        // the bias pointer's vector is of `output`'s type, cuBLASLt's default for a bias.
        unsafe {
            let set = |attr: Desc, value: *const std::ffi::c_void, size: usize| {
                lt::set_matmul_desc_attribute(desc.0, attr, value, size).map_err(|e| failed("attribute", e))
            };
            set(Desc::CUBLASLT_MATMUL_DESC_TRANSA, &op_a as *const _ as *const _, std::mem::size_of_val(&op_a))?;
            set(Desc::CUBLASLT_MATMUL_DESC_TRANSB, &op_b as *const _ as *const _, std::mem::size_of_val(&op_b))?;
            set(Desc::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue as *const _ as *const _, std::mem::size_of_val(&epilogue))?;
            set(Desc::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias as *const u64 as *const _, std::mem::size_of::<u64>())?;
        }
        let preference = LtDescriptor(lt::create_matmul_pref().map_err(|e| failed("preference", e))?, lt::destroy_matmul_pref);
        let workspace_bytes = BLAS_LT_WORKSPACE;
        // cuBLASLt chooses among algorithms for operands on 256 bytes unless told how they are aligned, and one that
        // reads an operand on fewer with wide loads faults on the device, after the call, losing the context. The
        // tensors of the flat buffers start wherever the ones before them end.
        let alignment = |addr: u64| -> u32 { 1 << addr.trailing_zeros().min(8) };
        let alignments = [
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(cm.a)),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(cm.b)),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(cm.c)),
            (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(cm.c)),
        ];
        // SAFETY: as above; the algorithm found fits the workspace it is given below.
        unsafe {
            lt::set_matmul_pref_attribute(
                preference.0,
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace_bytes as *const usize as *const _,
                std::mem::size_of::<usize>(),
            )
            .map_err(|e| failed("preference", e))?;
            for (attr, bytes) in alignments {
                lt::set_matmul_pref_attribute(preference.0, attr, &bytes as *const u32 as *const _, std::mem::size_of::<u32>())
                    .map_err(|e| failed("preference", e))?;
            }
            let heuristic = lt::get_matmul_algo_heuristic(*handle, desc.0, a_layout.0, b_layout.0, c_layout.0, c_layout.0, preference.0)
                .map_err(|e| failed("algorithm search", e))?;
            // SAFETY: the caller's a, b, c and bias hold what `g` describes; alpha and beta are host f32s (the
            // descriptor's scale type), read before the call returns; C is also D, written in place.
            lt::matmul(
                *handle,
                desc.0,
                &g.alpha as *const f32 as *const _,
                &g.beta as *const f32 as *const _,
                cm.a as *const _,
                a_layout.0,
                cm.b as *const _,
                b_layout.0,
                cm.c as *const _,
                c_layout.0,
                cm.c as *mut _,
                c_layout.0,
                &heuristic.algo,
                *workspace as *mut _,
                workspace_bytes,
                stream.cu_stream() as *mut _,
            )
            .map_err(|e| failed("matmul", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::capability_problem;

    #[test]
    fn a_gpu_runs_builds_for_its_architecture_or_older_ones() {
        assert_eq!(capability_problem(0, "NVIDIA H200", 90, 90), None);
        assert_eq!(capability_problem(0, "NVIDIA H200", 90, 80), None);
        assert_eq!(capability_problem(0, "NVIDIA A100", 80, 80), None);
    }

    #[test]
    fn a_build_for_a_newer_architecture_names_the_rebuild() {
        let problem = capability_problem(1, "NVIDIA A100-SXM4-80GB", 80, 90).unwrap();
        assert_eq!(
            problem,
            "GPU 1 (NVIDIA A100-SXM4-80GB) has compute capability 8.0, older than the 9.0 this CUDA build was compiled for; rebuild it for this GPU with `CUDA_COMPUTE_CAP=80 npm run build:cuda`"
        );
        assert!(capability_problem(0, "NVIDIA L4", 89, 90).unwrap().contains("CUDA_COMPUTE_CAP=89"));
    }

    #[test]
    fn a_gpu_without_bfloat16_tensor_cores_is_refused() {
        let problem = capability_problem(0, "Tesla T4", 75, 80).unwrap();
        assert!(problem.starts_with("GPU 0 (Tesla T4) has compute capability 7.5, and the CUDA engine needs 8.0 or newer"), "{problem}");
        assert!(problem.ends_with("use --device=cpu"), "{problem}");
    }
}
