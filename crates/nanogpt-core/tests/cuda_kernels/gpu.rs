//! The GPU the kernel tests launch on, and helpers for their buffers. By default that is the emulator
//! (`cuda-on-cpu`). A `cuda` build run with `NANOGPT_TEST_DEVICE=cuda` runs the same tests on the
//! first CUDA device instead: the tests' host buffers are page-locked and mapped for the duration of
//! each launch, so the kernels read and write them in place.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::Result;
use half::bf16;
use nanogpt_core::kernels::cuda::{Arg, Gpu, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every buffer handed to a kernel through [`addr`]: its address and length in bytes.
fn buffers() -> &'static Mutex<HashMap<u64, usize>> {
    static BUFFERS: OnceLock<Mutex<HashMap<u64, usize>>> = OnceLock::new();
    BUFFERS.get_or_init(Default::default)
}

/// The address a kernel sees for `buffer`, which must be a heap allocation (a Vec): the kernel may
/// write through it, and the compiler keeps no copy of heap memory across the opaque launch, while it
/// may keep a stack array's elements in registers.
pub fn addr<T>(buffer: &[T]) -> u64 {
    let address = buffer.as_ptr() as u64;
    buffers().lock().unwrap().insert(address, std::mem::size_of_val(buffer));
    address
}

struct Emulated;

impl Gpu for Emulated {
    fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()> {
        let mut args = args.to_vec();
        let mut params = Arg::kernel_params(&mut args);
        // SAFETY: the launch functions of kernels/cuda pass arguments of the types the kernel declares,
        // and the tests pass addresses of live buffers of the sizes the kernel reads and writes.
        unsafe { cuda_on_cpu::launch(kernel, grid, block, shared_bytes, &mut params) }.map_err(candle_core::Error::Msg)
    }
}

/// Where the tests run, chosen once per test process.
pub fn gpu() -> &'static dyn Gpu {
    static GPU: OnceLock<Box<dyn Gpu + Send + Sync>> = OnceLock::new();
    GPU.get_or_init(|| match std::env::var("NANOGPT_TEST_DEVICE").as_deref() {
        Ok("cuda") => device::open(),
        Ok(other) if !other.is_empty() => panic!("NANOGPT_TEST_DEVICE={other}: use `cuda`, or leave it unset for the emulator"),
        _ => Box::new(Emulated),
    })
    .as_ref()
}

#[cfg(not(feature = "cuda"))]
mod device {
    pub fn open() -> Box<dyn super::Gpu + Send + Sync> {
        panic!("NANOGPT_TEST_DEVICE=cuda needs this test built with `--features cuda`")
    }
}

#[cfg(feature = "cuda")]
mod device {
    use cudarc::driver::sys;

    use super::*;

    /// The engine's kernels on a CUDA device, reading and writing the tests' host buffers in place.
    struct Device(nanogpt_core::cuda::Kernels);

    pub fn open() -> Box<dyn Gpu + Send + Sync> {
        let device = nanogpt_core::cuda::open(0, 0).expect("NANOGPT_TEST_DEVICE=cuda: no CUDA device");
        let kernels = nanogpt_core::cuda::Kernels::new(&device).unwrap();
        let ordinal = 0;
        let mut maps_host = 0;
        let attribute = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM;
        unsafe { sys::cuDeviceGetAttribute(&mut maps_host, attribute, ordinal) }.result().unwrap();
        assert_eq!(maps_host, 1, "this GPU cannot use host pointers to registered memory, which the kernel tests rely on");
        eprintln!("cuda_kernels: running on CUDA device 0");
        Box::new(Device(kernels))
    }

    fn check(what: &str, result: sys::CUresult) -> Result<()> {
        result.result().map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))
    }

    impl Gpu for Device {
        fn launch(&self, kernel: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, args: &[Arg]) -> Result<()> {
            static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
            let _serial = ONE_AT_A_TIME.lock().unwrap();
            // Whole pages, merged where they touch: a page can be registered only once.
            const PAGE: u64 = 4096;
            let known = buffers().lock().unwrap();
            let mut ranges: Vec<(u64, u64)> = args
                .iter()
                .filter_map(|a| match a {
                    Arg::Ptr(p) if *p != 0 => known.get(p).map(|&len| (p / PAGE * PAGE, (p + len as u64).div_ceil(PAGE) * PAGE)),
                    _ => None,
                })
                .collect();
            drop(known);
            ranges.sort();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (start, end) in ranges {
                match merged.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            for &(start, end) in &merged {
                let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
                check("registering a test buffer", unsafe { sys::cuMemHostRegister_v2(start as *mut _, (end - start) as usize, flags) })?;
            }
            let launched = self.0.launch(kernel, grid, block, shared_bytes, args);
            let finished = self.0.device().cuda_stream().synchronize().map_err(|e| candle_core::Error::Msg(format!("{kernel}: {e}")));
            for &(start, _) in &merged {
                check("unregistering a test buffer", unsafe { sys::cuMemHostUnregister(start as *mut _) })?;
            }
            launched.and(finished)
        }
    }
}

/// Activations in the kernels' precision X; the CPU kernels take `values()`, which for bf16 are the
/// rounded values the GPU sees.
pub enum Buffer {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Buffer {
    pub fn new(x: Precision, values: &[f32]) -> Self {
        match x {
            Precision::F32 => Buffer::F32(values.to_vec()),
            Precision::Bf16 => Buffer::Bf16(to_bf16(values)),
        }
    }

    pub fn addr(&self) -> u64 {
        match self {
            Buffer::F32(v) => addr(v),
            Buffer::Bf16(v) => addr(v),
        }
    }

    pub fn values(&self) -> Vec<f32> {
        match self {
            Buffer::F32(v) => v.clone(),
            Buffer::Bf16(v) => from_bf16(v),
        }
    }
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
