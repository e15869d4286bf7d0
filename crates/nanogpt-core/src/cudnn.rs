//! cuDNN's fused flash attention for the CUDA device's [`Gpu`](crate::kernels::cuda::Gpu): a safe face on
//! kernels/cuda/attention_cudnn.cpp (compiled by build.rs), which builds cuDNN's SDPA graphs through the cuDNN
//! frontend and loads libcudnn.so.9 and the CUDA runtime at run time, so that the CUDA addon needs cuDNN only where
//! it is asked for (`NANOGPT_CUDA_ATTENTION=cudnn`).

use std::ffi::{c_char, c_int, c_void, CStr};

use candle_core::{bail, Result};
use cudarc::driver;

use crate::kernels::cuda::attention::CudnnCall;

#[repr(C)]
struct NanogptCudnn {
    _opaque: [u8; 0],
}

/// attention_cudnn.cpp's `NanogptAttentionShape`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Shape {
    b: c_int,
    t: c_int,
    c: c_int,
    n_head: c_int,
}

extern "C" {
    fn nanogpt_cudnn_open(stream: *mut c_void, out: *mut *mut NanogptCudnn, error: *mut c_char, error_len: usize) -> c_int;
    fn nanogpt_cudnn_close(cudnn: *mut NanogptCudnn);
    fn nanogpt_cudnn_attention_workspace(
        cudnn: *mut NanogptCudnn,
        backward: c_int,
        shape: Shape,
        bytes: *mut i64,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn nanogpt_cudnn_attention_forward(
        cudnn: *mut NanogptCudnn,
        out: *mut c_void,
        lse: *mut c_void,
        qkv: *mut c_void,
        shape: Shape,
        workspace: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn nanogpt_cudnn_attention_backward(
        cudnn: *mut NanogptCudnn,
        dqkv: *mut c_void,
        dout: *mut c_void,
        qkv: *mut c_void,
        out: *mut c_void,
        lse: *mut c_void,
        shape: Shape,
        workspace: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// What the user can do when cuDNN cannot run: said after the reason.
const FIX: &str = "install cuDNN 9 (pip install nvidia-cudnn-cu13) and put its lib/ and the CUDA runtime's (libcudart.so.13) on \
                   LD_LIBRARY_PATH, or unset NANOGPT_CUDA_ATTENTION";

/// Calls `f` with a buffer for the C side's reason, which becomes the error's one line. The frontend puts the
/// particulars (each candidate plan's failure) on the lines after its first, so the lines are joined.
fn checked(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut error = vec![0 as c_char; 4096];
    if f(error.as_mut_ptr(), error.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the C side writes a NUL-terminated string into the buffer (snprintf) before it returns 1.
    let reason = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
    let reason: Vec<&str> = reason.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    let reason = if reason.is_empty() { "no reason given".to_string() } else { reason.join(" | ") };
    bail!("{what}: {reason}; {FIX}")
}

/// A cuDNN handle on the device's stream, the plans built so far (one per shape and direction) and the workspace
/// they run in, from the device's pool.
pub(crate) struct Cudnn {
    handle: *mut NanogptCudnn,
    stream: std::sync::Arc<driver::CudaStream>,
    workspace: u64,
    workspace_bytes: usize,
}

// SAFETY: the handle is used by one thread at a time (`Kernels` keeps it under a mutex), and cuDNN handles are not
// tied to the thread that made them.
unsafe impl Send for Cudnn {}

impl Cudnn {
    /// Loads libcudnn.so.9 and makes a handle that queues its work on `stream`, whose context is current.
    pub fn open(stream: std::sync::Arc<driver::CudaStream>) -> Result<Self> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: `stream` is a live CUstream of the current context; `handle` receives the new handle.
        checked("cuDNN attention (NANOGPT_CUDA_ATTENTION=cudnn)", |error, len| unsafe {
            nanogpt_cudnn_open(stream.cu_stream() as *mut c_void, &mut handle, error, len)
        })?;
        Ok(Self { handle, stream, workspace: 0, workspace_bytes: 0 })
    }

    /// Queues `call`. The first call of a shape builds its plan (cuDNN's heuristics choose the kernel), and the
    /// workspace grows to what the plan needs.
    pub fn run(&mut self, call: &CudnnCall) -> Result<()> {
        let (backward, b, t, c, n_head) = match *call {
            CudnnCall::Forward { b, t, c, n_head, .. } => (0, b, t, c, n_head),
            CudnnCall::Backward { b, t, c, n_head, .. } => (1, b, t, c, n_head),
        };
        let shape = Shape { b: b as c_int, t: t as c_int, c: c as c_int, n_head: n_head as c_int };
        let mut bytes = 0i64;
        // SAFETY: the handle is live; `bytes` receives the size.
        checked("cuDNN attention plan", |error, len| unsafe {
            nanogpt_cudnn_attention_workspace(self.handle, backward, shape, &mut bytes, error, len)
        })?;
        self.reserve(bytes as usize)?;
        let workspace = self.workspace as *mut c_void;
        let ptr = |addr: u64| addr as *mut c_void;
        // SAFETY: the buffers hold the layouts attention.rs's `forward` and `backward` state for this shape (the
        // caller's contract), the workspace has the bytes the plan asked for, and both are on the handle's stream.
        match *call {
            CudnnCall::Forward { out, lse, qkv, .. } => checked("cuDNN attention forward", |error, len| unsafe {
                nanogpt_cudnn_attention_forward(self.handle, ptr(out), ptr(lse), ptr(qkv), shape, workspace, error, len)
            }),
            CudnnCall::Backward { dqkv, dout, qkv, out, lse, .. } => checked("cuDNN attention backward", |error, len| unsafe {
                nanogpt_cudnn_attention_backward(
                    self.handle,
                    ptr(dqkv),
                    ptr(dout),
                    ptr(qkv),
                    ptr(out),
                    ptr(lse),
                    shape,
                    workspace,
                    error,
                    len,
                )
            }),
        }
    }

    /// A workspace of at least `bytes` bytes, replaced in the stream's order: the work queued before still runs
    /// in the old one.
    fn reserve(&mut self, bytes: usize) -> Result<()> {
        if bytes <= self.workspace_bytes {
            return Ok(());
        }
        let stream = self.stream.cu_stream();
        let failed = |e: driver::DriverError| candle_core::Error::Msg(format!("cuDNN attention workspace of {bytes} bytes: {e}"));
        // SAFETY: the old workspace came from this stream's pool; the new one is a fresh allocation on it.
        unsafe {
            if self.workspace != 0 {
                driver::result::free_async(self.workspace, stream).map_err(failed)?;
                self.workspace = 0;
                self.workspace_bytes = 0;
            }
            self.workspace = driver::result::malloc_async(stream, bytes).map_err(failed)?;
        }
        self.workspace_bytes = bytes;
        Ok(())
    }
}

impl Drop for Cudnn {
    fn drop(&mut self) {
        // The plans own the kernels that work still queued may be running, and cuDNN's calls need the context
        // current on whichever thread drops this. Failures leave the handle and memory to the process's end.
        if self.stream.context().bind_to_thread().is_err() || self.stream.synchronize().is_err() {
            return;
        }
        // SAFETY: the handle and workspace are this struct's, and no queued work uses them any more.
        unsafe {
            nanogpt_cudnn_close(self.handle);
            if self.workspace != 0 {
                let _ = driver::result::free_async(self.workspace, self.stream.cu_stream());
            }
        }
    }
}
