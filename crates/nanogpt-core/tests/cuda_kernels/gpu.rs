//! The GPU the kernel tests launch on, and helpers for their buffers, which live in its memory. By
//! default that is the emulator (`cuda-on-cpu`), whose "device" memory is host memory it allocates and
//! range-checks. A `cuda` build run with `NANOGPT_TEST_DEVICE=cuda` runs the same tests on the first CUDA
//! device instead, through the engine's own [`Kernels`](nanogpt_core::cuda::Kernels).

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{bail, Result};
use cuda_on_cpu::CopyLanding;
use half::bf16;
use nanogpt_core::kernels::cuda::{Arg, DeviceBuffer, Gemm, Gpu, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The emulator, its memory host allocations (by address, with their layouts), and its matrix products
/// plain loops.
#[derive(Default)]
struct Emulated {
    allocations: Arc<Mutex<BTreeMap<u64, Layout>>>,
    /// When the kernels' asynchronous copies land.
    landing: CopyLanding,
    /// A smaller shared-memory limit than the launcher's, to stand for a smaller GPU.
    shared_limit: Option<u32>,
}

/// Alignment of the emulator's allocations: cudaMalloc's, ample for 128-bit loads.
const ALIGNMENT: usize = 256;

impl Emulated {
    /// Fails unless `bytes` bytes at `addr` lie in one allocation (from its start or any address inside
    /// it), at an address aligned for elements of `align` bytes. Nothing is anywhere, as a CUDA device's
    /// empty copies.
    fn check_range(&self, what: &str, addr: u64, bytes: usize, align: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let end = addr + bytes as u64;
        let allocations = self.allocations.lock().unwrap();
        let in_allocation = allocations.range(..=addr).next_back().is_some_and(|(&start, layout)| end <= start + layout.size() as u64);
        if !in_allocation {
            bail!("{what}: {bytes} bytes at {addr:#x} are not inside one allocation");
        }
        if !addr.is_multiple_of(align as u64) {
            bail!("{what}: {addr:#x} is not aligned to its {align}-byte elements");
        }
        Ok(())
    }

    fn read(&self, what: &str, addr: u64, precision: Precision, len: usize) -> Result<Vec<f32>> {
        self.check_range(what, addr, len * precision.size_in_bytes(), precision.size_in_bytes())?;
        // SAFETY: the range lies in a live buffer and is aligned for its elements (checked above).
        Ok(unsafe {
            match precision {
                Precision::F32 => std::slice::from_raw_parts(addr as *const f32, len).to_vec(),
                Precision::Bf16 => from_bf16(std::slice::from_raw_parts(addr as *const bf16, len)),
            }
        })
    }

    fn write(&self, what: &str, addr: u64, precision: Precision, values: &[f32]) -> Result<()> {
        self.check_range(what, addr, values.len() * precision.size_in_bytes(), precision.size_in_bytes())?;
        // SAFETY: as in `read`; no reference to the buffer is alive during the copy.
        unsafe {
            match precision {
                Precision::F32 => std::ptr::copy_nonoverlapping(values.as_ptr(), addr as *mut f32, values.len()),
                Precision::Bf16 => std::ptr::copy_nonoverlapping(to_bf16(values).as_ptr(), addr as *mut bf16, values.len()),
            }
        }
        Ok(())
    }
}

impl Gpu for Emulated {
    // Kernels touch only this GPU's memory, as on a device, where a host address would fault: a pointer
    // argument outside every allocation is refused before the kernel runs.
    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()> {
        for (i, arg) in args.iter().enumerate() {
            if let Arg::Ptr(addr) = *arg {
                if addr != 0 {
                    self.check_range(&format!("{kernel} argument {i}"), addr, 1, 1)?;
                }
            }
        }
        let mut args = args.to_vec();
        let mut params = Arg::kernel_params(&mut args);
        // SAFETY: the launch functions of kernels/cuda pass arguments of the types the kernel declares,
        // and the tests pass addresses inside live allocations of the sizes the kernel reads and writes.
        unsafe { cuda_on_cpu::launch_landing(kernel, grid, block, shared_bytes, &mut params, self.landing) }
            .map_err(candle_core::Error::Msg)
    }

    // The emulator's launcher refuses more than a Hopper GPU's limit.
    fn max_shared_bytes(&self) -> u32 {
        self.shared_limit.unwrap_or(227 * 1024)
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        let layout =
            Layout::from_size_align(bytes, ALIGNMENT).map_err(|e| candle_core::Error::Msg(format!("alloc of {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let addr = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
        if addr == 0 {
            bail!("alloc: out of host memory for {bytes} bytes");
        }
        self.allocations.lock().unwrap().insert(addr, layout);
        Ok(addr)
    }

    fn free(&self, addr: u64) -> Result<()> {
        if addr == 0 {
            return Ok(());
        }
        let Some(layout) = self.allocations.lock().unwrap().remove(&addr) else {
            bail!("free: {addr:#x} is not an allocation, or was freed already");
        };
        // SAFETY: `addr` was allocated with `layout` and is now forgotten, so it is freed once.
        unsafe { std::alloc::dealloc(addr as *mut u8, layout) };
        Ok(())
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.check_range("upload", dst, src.len(), 1)?;
        // SAFETY: the destination range lies in a live buffer (checked above), which `src` cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.check_range("download", src, dst.len(), 1)?;
        // SAFETY: the source range lies in a live buffer (checked above), which `dst` cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.check_range("zero", dst, bytes, 1)?;
        // SAFETY: the range lies in a live buffer (checked above).
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    // The product as cuBLAS receives it (`Gemm::column_major`), computed by BLAS's definition, so that the
    // tests check that translation too; a bias goes down each column there, as cuBLASLt's bias epilogue adds it.
    fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check()?;
        let cm = g.column_major();
        let stored_columns = |transposed: bool, rows: usize, cols: usize| if transposed { rows } else { cols };
        let a = self.read("gemm A", cm.a, g.inputs, cm.lda * stored_columns(cm.transpose_a, cm.m, cm.k))?;
        let b = self.read("gemm B", cm.b, g.inputs, cm.ldb * stored_columns(cm.transpose_b, cm.k, cm.n))?;
        let len = cm.ldc * cm.n;
        let mut c = if g.beta == 0.0 { vec![0.0; len] } else { self.read("gemm C", cm.c, g.output, len)? };
        let bias = match g.bias {
            Some(addr) => self.read("gemm bias", addr, g.output, cm.m)?,
            None => vec![0.0; cm.m],
        };
        let a_at = |i: usize, p: usize| if cm.transpose_a { a[p + i * cm.lda] } else { a[i + p * cm.lda] };
        let b_at = |p: usize, j: usize| if cm.transpose_b { b[j + p * cm.ldb] } else { b[p + j * cm.ldb] };
        for j in 0..cm.n {
            for i in 0..cm.m {
                let product: f32 = (0..cm.k).map(|p| a_at(i, p) * b_at(p, j)).sum();
                let old = if g.beta == 0.0 { 0.0 } else { g.beta * c[i + j * cm.ldc] };
                c[i + j * cm.ldc] = g.alpha * product + old + bias[i];
            }
        }
        self.write("gemm C", cm.c, g.output, &c)
    }
}

fn shared() -> &'static Arc<dyn Gpu + Send + Sync> {
    static GPU: OnceLock<Arc<dyn Gpu + Send + Sync>> = OnceLock::new();
    GPU.get_or_init(|| match std::env::var("NANOGPT_TEST_DEVICE").as_deref() {
        Ok("cuda") => device::open(),
        Ok(other) if !other.is_empty() => panic!("NANOGPT_TEST_DEVICE={other}: use `cuda`, or leave it unset for the emulator"),
        _ => emulator().clone(),
    })
}

fn emulator() -> &'static Arc<Emulated> {
    static EMULATOR: OnceLock<Arc<Emulated>> = OnceLock::new();
    EMULATOR.get_or_init(Default::default)
}

/// [`gpu`], but where the emulator lands each asynchronous copy as it is issued rather than at the barrier
/// after its wait (over the same memory): running a kernel on both covers both orders a missing wait or
/// barrier can break. On a CUDA device, the device itself.
pub fn gpu_landing_copies_early() -> &'static dyn Gpu {
    static EARLY: OnceLock<Arc<dyn Gpu + Send + Sync>> = OnceLock::new();
    EARLY
        .get_or_init(|| match on_cuda_device() {
            true => shared().clone(),
            false => Arc::new(Emulated { allocations: emulator().allocations.clone(), landing: CopyLanding::Early, shared_limit: None }),
        })
        .as_ref()
}

/// An emulated GPU that allows a block `limit` bytes of shared memory, for checks that launch nothing.
pub fn gpu_with_shared_limit(limit: u32) -> impl Gpu + Send + Sync {
    Emulated { shared_limit: Some(limit), ..Default::default() }
}

/// Where the tests run, chosen once per test process.
pub fn gpu() -> &'static dyn Gpu {
    shared().as_ref()
}

/// The same GPU, for [`DeviceBuffer`](nanogpt_core::kernels::cuda::DeviceBuffer)s.
pub fn shared_gpu() -> Arc<dyn Gpu + Send + Sync> {
    shared().clone()
}

/// Whether the tests run on a CUDA device, whose f32 products round their inputs to TF32.
pub fn on_cuda_device() -> bool {
    std::env::var("NANOGPT_TEST_DEVICE").as_deref() == Ok("cuda")
}

#[cfg(not(feature = "cuda"))]
mod device {
    pub fn open() -> std::sync::Arc<dyn super::Gpu + Send + Sync> {
        panic!("NANOGPT_TEST_DEVICE=cuda needs this test built with `--features cuda`")
    }
}

#[cfg(feature = "cuda")]
mod device {
    use std::sync::Arc;

    use nanogpt_core::kernels::cuda::Gpu;

    pub fn open() -> Arc<dyn Gpu + Send + Sync> {
        let device = nanogpt_core::cuda::open(0, 0).expect("NANOGPT_TEST_DEVICE=cuda: no CUDA device");
        let kernels = nanogpt_core::cuda::Kernels::new(&device).unwrap();
        eprintln!("cuda_kernels: running on CUDA device 0");
        Arc::new(kernels)
    }
}

/// Values in precision `x` on [`gpu`]: kernels get its `addr()`, the CPU kernels its `values()`, which
/// for bf16 are the rounded values the GPU holds.
pub struct Buffer {
    x: Precision,
    device: DeviceBuffer,
}

impl Buffer {
    pub fn new(x: Precision, values: &[f32]) -> Self {
        Buffer { x, device: device_buffer(x, values) }
    }

    /// Float statistics, gradients and losses, which are f32 in both precisions.
    pub fn f32(values: &[f32]) -> Self {
        Self::new(Precision::F32, values)
    }

    /// `n` NaNs, so that an element a kernel leaves unwritten fails the comparison.
    pub fn unwritten(x: Precision, n: usize) -> Self {
        Self::new(x, &vec![f32::NAN; n])
    }

    /// Its device address.
    pub fn addr(&self) -> u64 {
        self.device.addr
    }

    /// Its values once the work queued before has finished.
    pub fn values(&self) -> Vec<f32> {
        device_values(self.x, &self.device)
    }
}

/// Bytes on [`gpu`]: tokens, targets and tables of any element type.
pub fn device_bytes(bytes: &[u8]) -> DeviceBuffer {
    let buffer = DeviceBuffer::zeroed(&shared_gpu(), bytes.len()).unwrap();
    buffer.upload_bytes(bytes).unwrap();
    buffer
}

pub fn device_i32(values: &[i32]) -> DeviceBuffer {
    device_bytes(&values.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>())
}

/// f32 is held to single precision's rounding; bf16 outputs are rounded to 8 significant bits.
pub fn tolerance(x: Precision) -> f32 {
    match x {
        Precision::F32 => 1e-5,
        Precision::Bf16 => 1e-2,
    }
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

/// A buffer on [`gpu`] holding `values` in precision `x` (rounded to bf16 for bf16).
pub fn device_buffer(x: Precision, values: &[f32]) -> DeviceBuffer {
    let buffer = DeviceBuffer::zeroed(&shared_gpu(), values.len() * x.size_in_bytes()).unwrap();
    match x {
        Precision::F32 => buffer.upload_f32(values).unwrap(),
        Precision::Bf16 => buffer.upload_bytes(&to_bf16(values).iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>()).unwrap(),
    }
    buffer
}

/// The values of a buffer of precision `x`, once the work queued before has finished.
pub fn device_values(x: Precision, buffer: &DeviceBuffer) -> Vec<f32> {
    match x {
        Precision::F32 => buffer.download_f32().unwrap(),
        Precision::Bf16 => buffer.download_bytes().unwrap().chunks_exact(2).map(|b| bf16::from_ne_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}
