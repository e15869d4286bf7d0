//! The engine API that every binding exposes: one model, its optimizer and its accumulated
//! gradients. Inputs are plain slices and bytes, files are written to a [`Write`] sink (see
//! [`crate::files`]), so that bindings only translate types.

use std::collections::HashMap;
use std::io::{Seek, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::collective::{self, Collective, SingleProcess, Watchdog};
use crate::cuda::{self, MemoryStats};
use crate::decode;
use crate::decode_cuda::CudaGeneration;
use crate::hf;
use crate::kernels::cuda::{DeviceBuffer, Gpu, Precision};
use crate::kernels::dropout::DropoutKey;
use crate::model::{Gpt, Mode, ModelArgs};
use crate::optim::{AdamW, FlatAdamW, GradScaler, OptimizerArgs, ParamGroups, StepStats};
use crate::sample::{self, SampleArgs, Sampler};
use crate::torch_checkpoint::{self, CheckpointInfo, TorchCheckpoint};
use crate::train_step::{self, Activations, ParamLayout};
use crate::train_step_cuda::CudaTrainStep;

/// Trains a model with one of three steps: the explicit CPU step over flat buffers (`train_step.rs`,
/// on the CPU in float32), the explicit GPU step over the fused kernels (`train_step_cuda.rs`, on CUDA
/// in float32 and bfloat16), or candle's autograd graph (float16 on CUDA, `NANOGPT_CUDA_STEP=graph`,
/// and mixed precision on the CPU in tests).
pub struct Engine {
    /// The candle model: sampling, export, and the graph path's trained weights. On the explicit
    /// steps its weights are refreshed from the step's parameters when something reads them.
    model: Gpt,
    /// The CPU training step's state; None on the other paths.
    flat: Option<FlatTrainer>,
    /// The GPU training step's state; None on the other paths.
    gpu_step: Option<GpuTrainer>,
    /// Whether `model`'s weights are older than the explicit step's parameters.
    model_stale: AtomicBool,
    optimizer: Option<AdamW>,
    /// Graph path: the sum over the micro-steps since the last optimizer step, one per parameter.
    grads: Option<Vec<Tensor>>,
    /// Dropout masks are a hash of this seed and the micro-step's number, so that a seed fixes a whole run
    /// ([`Engine::set_dropout_stream`]).
    dropout_seed: u64,
    micro_steps: u64,
    /// float16 only: the dynamic loss scale.
    scaler: Option<GradScaler>,
    /// Per-phase wall times of the last step, when [`Engine::set_profiling`] is on.
    profile: Option<PhaseTimes>,
    /// The generation `start_sampling` began, continued by `next_tokens`.
    sampling: Option<Sampling>,
    /// The weights as the GPU decoder reads them (decode_cuda.rs), in its precision, kept between generations
    /// until the weights change.
    gpu_weights: Mutex<Option<(Precision, Arc<DeviceBuffer>)>>,
    /// The ranks of a data-parallel run, which average their gradients before every step.
    collective: Box<dyn Collective>,
    /// Whether a micro-step's backward pass averages the gradients over the ranks as it finishes them
    /// ([`Engine::set_backward_grad_sync`]).
    backward_grad_sync: bool,
    /// 1: the explicit step's AdamW state (CPU or GPU) is sharded over the ranks (ZeRO stage 1); 0: it is not.
    zero_stage: u32,
    /// The last micro-step's loss, behind a lock so that evaluation (`&Engine`) can settle it.
    last_loss: Mutex<Option<PendingLoss>>,
    /// On a CUDA device, the step that `configure_optimizer` moves training onto.
    cuda_step: CudaStep,
}

/// A micro-step's mean loss, wherever it is until someone reads it.
enum PendingLoss {
    Value(f32),
    /// The graph path's scalar, on the model's device.
    Tensor(Tensor),
    /// In the GPU step's loss buffer.
    GpuStep,
}

/// Sequences drawn token by token: by the CPU decoder over the flat parameters, by the GPU decoder
/// over its copy of them, or by the candle model (one KV-cached sampler per sequence).
enum Sampling {
    Decoder(Box<decode::Generation>),
    Gpu(Box<CudaGeneration>),
    Graph(Vec<Sampler>),
}

/// The explicit CPU training step's buffers: parameters, their gradients, AdamW's moments, and the
/// activations of the last batch shape.
struct FlatTrainer {
    layout: ParamLayout,
    params: Vec<f32>,
    /// Allocated by the first backward pass.
    grads: Vec<f32>,
    /// Whether `grads` holds gradients not yet applied (later micro-steps add to them).
    has_grads: bool,
    optimizer: Option<FlatAdamW>,
    /// Rank 0 under ZeRO-1: the whole AdamW state, gathered from every rank's shard for a checkpoint
    /// until the next step.
    gathered_optimizer: Option<FlatAdamW>,
    /// Behind a lock so that evaluation (which takes `&Engine`) can reuse them.
    activations: Mutex<Option<Activations>>,
}

impl FlatTrainer {
    fn new(model: &Gpt) -> Result<Self> {
        let layout = ParamLayout::new(&model.args);
        let mut params = vec![0f32; layout.len];
        copy_from_model(&layout, &mut params, model)?;
        Ok(Self {
            layout,
            params,
            grads: Vec::new(),
            has_grads: false,
            optimizer: None,
            gathered_optimizer: None,
            activations: Mutex::new(None),
        })
    }

    /// The activations for a (b, t) batch, reallocated only when the shape changes.
    fn activations<'a>(slot: &'a mut Option<Activations>, args: &ModelArgs, b: usize, t: usize) -> &'a mut Activations {
        if slot.as_ref().map(Activations::shape) != Some((b, t)) {
            *slot = None;
            *slot = Some(Activations::new(args, b, t));
        }
        slot.as_mut().expect("just allocated")
    }

    /// The model as the decoder reads it.
    fn weights<'a>(&'a self, args: &'a ModelArgs) -> decode::Weights<'a> {
        decode::Weights { args, layout: &self.layout, params: &self.params }
    }
}

/// A flat buffer laid out by `layout` as named tensors.
fn named(layout: &ParamLayout, buffer: &[f32]) -> Result<Vec<(String, Tensor)>> {
    layout
        .tensors
        .iter()
        .map(|t| Ok((t.name.clone(), Tensor::from_slice(&buffer[t.range.clone()], t.shape.as_slice(), &Device::Cpu)?)))
        .collect()
}

/// The explicit GPU step's state. The step sits behind a lock so that evaluation (which takes
/// `&Engine`) can run its forward pass.
struct GpuTrainer {
    gpu: Arc<dyn Gpu + Send + Sync>,
    step: Mutex<CudaTrainStep>,
    optimizer: Option<OptimizerArgs>,
    /// Whether the step holds gradients not yet applied (later micro-steps add to them).
    has_grads: bool,
    /// Whether they are already the mean over the ranks: the last micro-step's backward pass averaged them.
    grads_averaged: bool,
    /// Rank 0 under ZeRO-1: the whole AdamW state, gathered from every rank's shard for a checkpoint
    /// until the next step.
    gathered_optimizer: Option<FlatAdamW>,
}

impl GpuTrainer {
    fn new(gpu: Arc<dyn Gpu + Send + Sync>, model: &Gpt, precision: Precision) -> Result<Self> {
        let layout = ParamLayout::new(&model.args);
        let mut params = vec![0f32; layout.len];
        copy_from_model(&layout, &mut params, model)?;
        let step = CudaTrainStep::new(gpu.clone(), &model.args, precision, &params)?;
        Ok(Self { gpu, step: Mutex::new(step), optimizer: None, has_grads: false, grads_averaged: false, gathered_optimizer: None })
    }

    fn step(&self) -> std::sync::MutexGuard<'_, CudaTrainStep> {
        self.step.lock().expect("no panic while holding the GPU step")
    }
}

/// The precision the explicit GPU step computes in for nanoGPT's `dtype`.
fn gpu_step_precision(dtype: DType) -> Result<Precision> {
    match dtype {
        DType::F32 => Ok(Precision::F32),
        DType::BF16 => Ok(Precision::Bf16),
        other => {
            candle_core::bail!("the fused CUDA step computes in float32 or bfloat16, not {other:?}: set dtype, or unset NANOGPT_CUDA_STEP")
        }
    }
}

/// The step a CUDA engine trains on, from `NANOGPT_CUDA_STEP`: `fused` or `graph`, and unset, the fused step
/// in float32 and bfloat16 and candle's graph in float16, which the fused step does not have.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CudaStep {
    Fused,
    Graph,
    FusedUnlessFloat16,
}

impl CudaStep {
    fn from_env() -> Result<Self> {
        match std::env::var("NANOGPT_CUDA_STEP").as_deref() {
            Err(_) => Ok(CudaStep::FusedUnlessFloat16),
            Ok("fused") => Ok(CudaStep::Fused),
            Ok("graph") => Ok(CudaStep::Graph),
            Ok(other) => candle_core::bail!("NANOGPT_CUDA_STEP must be fused or graph, got `{other}`"),
        }
    }
}

/// The model's weights into the flat buffer `params` laid out by `layout`.
fn copy_from_model(layout: &ParamLayout, params: &mut [f32], model: &Gpt) -> Result<()> {
    for (t, (name, var)) in layout.tensors.iter().zip(model.named_parameters()) {
        if t.name != name || t.shape.as_slice() != var.dims() {
            candle_core::bail!("flat layout `{}` {:?} does not match the model's `{name}` {:?}", t.name, t.shape, var.dims());
        }
        // Straight from the storage: a temporary copy per tensor would stay in the process's heap.
        let tensor = var.as_tensor();
        if !tensor.device().is_cpu() {
            params[t.range.clone()].copy_from_slice(&tensor.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            continue;
        }
        let (storage, layout) = tensor.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
            candle_core::bail!("the training step needs the weights in contiguous CPU memory");
        };
        params[t.range.clone()].copy_from_slice(&cpu.as_slice::<f32>()?[start..end]);
    }
    Ok(())
}

/// Milliseconds of the phases of the last micro-step and optimizer step, each measured up to a
/// device synchronisation (so they add up to the step time on a GPU too).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, ts_rs::TS)]
pub struct PhaseTimes {
    /// Uploading the batch.
    pub data_ms: f64,
    pub forward_ms: f64,
    /// Backward and accumulating the gradients.
    pub backward_ms: f64,
    /// Clipping and AdamW.
    pub optimizer_ms: f64,
}

/// Which GPU nanoGPT's `device` key names, `cuda` being the first and `cuda:N` the Nth, or None for `cpu`. Other
/// names are refused with the ones there are, before anything is opened or read.
pub fn device_ordinal(name: &str) -> Result<Option<usize>> {
    match name {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        "mps" => candle_core::bail!("device `mps` (Apple's Metal) has no engine here; use --device=cpu"),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Ok(Some(ordinal)),
            _ => candle_core::bail!("unknown device `{other}`: use cpu, cuda or cuda:N"),
        },
    }
}

/// The device `name` names (see [`device_ordinal`]). `seed` seeds the device's own generator (dropout masks on a GPU).
pub fn device(name: &str, seed: u64) -> Result<Device> {
    match device_ordinal(name)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => cuda::open(ordinal, seed),
    }
}

/// Dropout's stream apart from the weights' initialisation, which `seed` seeds too.
fn dropout_seed_for(seed: u64) -> u64 {
    seed ^ 0x5eed_d809
}

/// What sets a rank's dropout stream apart from the other ranks': 0 on rank 0.
fn rank_stream(rank: usize) -> u64 {
    (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// nanoGPT's `dtype` key: the dtype the forward and backward passes compute in.
pub fn compute_dtype(name: &str) -> Result<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        "float16" => Ok(DType::F16),
        other => candle_core::bail!("unknown dtype `{other}`: use float32, bfloat16 or float16"),
    }
}

/// Process-wide CPU settings, applied once before the first tensor is made.
fn configure_cpu_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // candle's own worker pool spins while waiting; next to gemm's rayon pool (which our fused
        // kernels share) it oversubscribes small machines several times over. One pool is enough.
        #[cfg(not(target_arch = "wasm32"))]
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        // A training step allocates and frees the same activation sizes every time; glibc would
        // return each large block to the kernel and take page faults to get it back.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        }
    });
}

impl Engine {
    pub fn new(args: &ModelArgs, seed: u64, device_name: &str) -> Result<Self> {
        configure_cpu_runtime();
        let model = Gpt::new(args, seed, &device(device_name, seed)?)?;
        Self::wrap(model, seed)
    }

    /// A model with `args` whose weights are the safetensors `bytes` (nanoGPT's parameter names).
    pub fn from_safetensors(args: &ModelArgs, bytes: &[u8], device_name: &str) -> Result<Self> {
        configure_cpu_runtime();
        let device = device(device_name, 0)?;
        let mut engine = Self::wrap(Gpt::empty(args, &device)?, 0)?;
        engine.load_weights(&load_safetensors(bytes, "weights")?)?;
        Ok(engine)
    }

    /// A Hugging Face GPT-2 (`config.json` text and `model.safetensors` bytes), e.g. OpenAI's weights,
    /// with `dropout` in place of the config's. GPT-2 XL's 6.4 GB come from a mapped file
    /// ([`crate::files::map`]): they would not fit in a Node.js Buffer.
    pub fn from_hf_gpt2(config_json: &str, bytes: &[u8], dropout: f64, device_name: &str) -> Result<Self> {
        configure_cpu_runtime();
        let device = device(device_name, 0)?;
        let model = hf::import(config_json, load_safetensors(bytes, "weights")?, dropout, &device)?;
        Self::wrap(model, 0)
    }

    /// The model's architecture as it is now (after any crop).
    pub fn model_args(&self) -> &ModelArgs {
        &self.model.args
    }

    /// Ends any generation in progress and drops the GPU decoder's copy of the weights, before the weights
    /// change (training steps, loading, cropping, rank 0's broadcast).
    fn weights_changing(&mut self) {
        self.sampling = None;
        *self.gpu_weights.get_mut().expect("no panic while holding the GPU weights") = None;
    }

    /// Shrinks the context to `block_size` positions (nanoGPT's `crop_block_size`).
    pub fn crop_block_size(&mut self, block_size: usize) -> Result<()> {
        self.weights_changing();
        if self.optimizer_configured() {
            candle_core::bail!("crop the block size before configuring the optimizer, which holds the old position embedding");
        }
        self.sync_model()?;
        self.model.crop_block_size(block_size)?;
        self.use_flat_step(self.flat.is_some())?;
        let precision = self.gpu_step.as_ref().map(|g| g.step().precision());
        self.use_gpu_step(None, precision.unwrap_or(Precision::F32))
    }

    fn wrap(model: Gpt, seed: u64) -> Result<Self> {
        let mut engine = Self {
            model,
            flat: None,
            gpu_step: None,
            model_stale: AtomicBool::new(false),
            optimizer: None,
            grads: None,
            dropout_seed: dropout_seed_for(seed),
            micro_steps: 0,
            scaler: None,
            profile: None,
            sampling: None,
            gpu_weights: Mutex::new(None),
            collective: Box::new(SingleProcess),
            backward_grad_sync: false,
            zero_stage: 0,
            last_loss: Mutex::new(None),
            cuda_step: CudaStep::Graph,
        };
        engine.use_flat_step(engine.model.device().is_cpu())?;
        if engine.model.device().is_cuda() {
            engine.cuda_step = CudaStep::from_env()?;
        }
        Ok(engine)
    }

    /// Trains this CUDA model through candle's autograd graph rather than the fused step (as
    /// `NANOGPT_CUDA_STEP=graph` does); call it before configuring the optimizer.
    pub fn train_on_graph(&mut self) -> Result<()> {
        if self.optimizer_configured() {
            candle_core::bail!("choose the graph before configuring the optimizer");
        }
        self.cuda_step = CudaStep::Graph;
        Ok(())
    }

    /// On a CUDA device, moves training onto the fused step unless `cuda_step` or float16 keeps it on the
    /// graph. The step holds the weights, their gradients and the AdamW moments on the device, so it
    /// starts with the optimizer: an engine that only samples or evaluates does not pay for it.
    fn start_fused_cuda_step(&mut self) -> Result<()> {
        if self.gpu_step.is_some() || !self.trains_on_fused_cuda_step() {
            return Ok(());
        }
        let precision = gpu_step_precision(self.model.compute_dtype())?;
        #[cfg(feature = "cuda")]
        {
            let kernels = Arc::new(cuda::Kernels::new(self.model.device())?);
            self.use_gpu_step(Some(kernels), precision)
        }
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("a CUDA device in a build without CUDA cannot run the fused step in {precision:?}")
    }

    /// Whether `configure_optimizer` moves training onto the explicit GPU step: on a CUDA device, unless
    /// NANOGPT_CUDA_STEP or float16 keep it on candle's graph.
    fn trains_on_fused_cuda_step(&self) -> bool {
        let graph = match self.cuda_step {
            CudaStep::Graph => true,
            CudaStep::FusedUnlessFloat16 => self.model.compute_dtype() == DType::F16,
            CudaStep::Fused => false,
        };
        self.model.device().is_cuda() && !graph
    }

    /// Trains this model from now on with the explicit GPU step on `gpu` (a CUDA device's kernels, or
    /// an emulator of them) in float32, carrying its weights over; the candle model stays where it is,
    /// for sampling and export.
    pub fn train_on_gpu_step(&mut self, gpu: Arc<dyn Gpu + Send + Sync>) -> Result<()> {
        if self.optimizer_configured() || self.has_grads() {
            candle_core::bail!("move training onto the GPU step before configuring the optimizer");
        }
        self.use_flat_step(false)?;
        self.model.set_compute_dtype(DType::F32);
        self.use_gpu_step(Some(gpu), Precision::F32)
    }

    /// Moves training onto the explicit GPU step on `gpu` (None: the current one's) in `precision`,
    /// carrying the weights over; without a GPU step this does nothing.
    fn use_gpu_step(&mut self, gpu: Option<Arc<dyn Gpu + Send + Sync>>, precision: Precision) -> Result<()> {
        let Some(gpu) = gpu.or_else(|| self.gpu_step.as_ref().map(|g| g.gpu.clone())) else { return Ok(()) };
        self.sync_model()?;
        self.gpu_step = None;
        self.gpu_step = Some(GpuTrainer::new(gpu, &self.model, precision)?);
        Ok(())
    }

    fn optimizer_configured(&self) -> bool {
        self.optimizer.is_some()
            || self.flat.as_ref().is_some_and(|f| f.optimizer.is_some())
            || self.gpu_step.as_ref().is_some_and(|g| g.optimizer.is_some())
    }

    fn has_grads(&self) -> bool {
        self.grads.is_some() || self.flat.as_ref().is_some_and(|f| f.has_grads) || self.gpu_step.as_ref().is_some_and(|g| g.has_grads)
    }

    /// Switches between the explicit CPU step (`on`) and the autograd graph, carrying the weights over.
    fn use_flat_step(&mut self, on: bool) -> Result<()> {
        self.sync_model()?;
        self.flat = if on { Some(FlatTrainer::new(&self.model)?) } else { None };
        Ok(())
    }

    /// Brings the candle model's weights up to date with the explicit step's parameters.
    fn sync_model(&self) -> Result<()> {
        if !self.model_stale.load(Ordering::Acquire) {
            return Ok(());
        }
        let downloaded;
        let (layout, params) = match (self.flat.as_ref(), self.gpu_step.as_ref()) {
            (Some(flat), _) => (&flat.layout, &flat.params),
            (None, Some(gpu_step)) => {
                let step = gpu_step.step();
                downloaded = step.read_params()?;
                (&ParamLayout::new(&self.model.args), &downloaded)
            }
            (None, None) => return Ok(()),
        };
        for (t, (_, var)) in layout.tensors.iter().zip(self.model.named_parameters()) {
            var.set(&Tensor::from_slice(&params[t.range.clone()], t.shape.as_slice(), self.model.device())?)?;
        }
        self.model_stale.store(false, Ordering::Release);
        Ok(())
    }

    /// The candle model with current weights.
    fn synced_model(&self) -> Result<&Gpt> {
        self.sync_model()?;
        Ok(&self.model)
    }

    /// nanoGPT's `dtype`: float32, or mixed precision with bfloat16 or float16 (weights and AdamW
    /// state stay f32; float16 adds GradScaler's dynamic loss scaling). The CPU engine computes in
    /// float32 only: candle's CPU matmul has no bfloat16.
    pub fn set_precision(&mut self, dtype: &str) -> Result<()> {
        let compute = compute_dtype(dtype)?;
        if self.gpu_step.is_some() {
            return self.set_compute_dtype(compute);
        }
        if self.model.device().is_cpu() && compute != DType::F32 {
            candle_core::bail!("dtype {dtype} needs a GPU: the cpu engine computes in float32");
        }
        self.set_compute_dtype(compute)
    }

    /// As [`Engine::set_precision`] without the CPU check, so that the mixed-precision path can be
    /// tested on the CPU with float16 (which candle's CPU matmul supports).
    /// The explicit step computes in float32 only, so another dtype trains the CPU model through the graph.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if let Some(gpu_step) = self.gpu_step.as_ref() {
            let precision = gpu_step_precision(dtype)?;
            if precision != gpu_step.step().precision() {
                if self.optimizer_configured() {
                    candle_core::bail!("set the precision before configuring the optimizer");
                }
                self.use_gpu_step(None, precision)?;
            }
            // The candle model samples in float32 where it sits on the CPU (the emulated GPU step's case).
            self.model.set_compute_dtype(if self.model.device().is_cpu() { DType::F32 } else { dtype });
            return Ok(());
        }
        let flat = self.model.device().is_cpu() && dtype == DType::F32;
        if flat != self.flat.is_some() {
            if self.optimizer_configured() {
                candle_core::bail!("set the precision before configuring the optimizer");
            }
            self.use_flat_step(flat)?;
        }
        self.model.set_compute_dtype(dtype);
        self.scaler = (dtype == DType::F16).then(GradScaler::default);
        Ok(())
    }

    /// The loss scale in use (1 unless training in float16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, GradScaler::scale)
    }

    /// Waits until the device has finished all queued work (a no-op on the CPU), for timings.
    pub fn synchronize(&self) -> Result<()> {
        self.model.device().synchronize()
    }

    /// Device memory figures; None on the CPU.
    pub fn memory_stats(&self) -> Result<Option<MemoryStats>> {
        cuda::memory_stats(self.model.device())
    }

    /// Turns per-phase timing on or off. On a GPU it synchronises between phases, which costs a
    /// little throughput.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        if on && cfg!(target_arch = "wasm32") {
            candle_core::bail!("phase timing needs a clock, which the WebAssembly engine does not have; profile with --engine=native");
        }
        self.profile = on.then(PhaseTimes::default);
        Ok(())
    }

    /// The phase times of the last micro-step and optimizer step, when profiling.
    pub fn phase_times(&self) -> Option<&PhaseTimes> {
        self.profile.as_ref()
    }

    /// Now, when profiling (wasm32 has no clock to read otherwise).
    fn mark(&self) -> Option<std::time::Instant> {
        self.profile.is_some().then(std::time::Instant::now)
    }

    /// Milliseconds since `start`, after the device has caught up; None (and no wait) when not profiling.
    fn lap(&self, start: Option<std::time::Instant>) -> Result<Option<f64>> {
        let Some(start) = start else { return Ok(None) };
        self.synchronize()?;
        Ok(Some(start.elapsed().as_secs_f64() * 1e3))
    }

    /// Makes this model one rank of a data-parallel run over `collective`: its weights become rank 0's,
    /// its dropout masks its own, and each [`Engine::step`] averages the gradients over the ranks first.
    /// A call that waits longer than `timeout` for the other ranks ends the process (see [`Watchdog`]).
    pub fn join(&mut self, mut collective: Box<dyn Collective>, timeout: std::time::Duration) -> Result<()> {
        if self.has_grads() {
            candle_core::bail!("join the data-parallel run before the first forward_backward");
        }
        if collective.world_size() > 1 {
            collective = Box::new(Watchdog::new(collective, timeout));
        }
        self.weights_changing();
        match (self.flat.as_mut(), self.gpu_step.as_ref()) {
            (Some(flat), _) => {
                collective.broadcast(&mut flat.params, 0);
                self.model_stale.store(true, Ordering::Release);
            }
            (None, Some(gpu_step)) => {
                let step = gpu_step.step();
                let mut params = step.read_params()?;
                collective.broadcast(&mut params, 0);
                step.load_params(&params)?;
                self.model_stale.store(true, Ordering::Release);
            }
            (None, None) => collective.broadcast_vars(&self.params().into_iter().map(|(_, v)| v).collect::<Vec<_>>(), 0)?,
        }
        // Each rank its own dropout masks, also where the model came from a file (whose seed is 0 on every rank);
        // rank 0 keeps its own, so that it trains as a single process would.
        self.dropout_seed ^= rank_stream(collective.rank());
        self.collective = collective;
        Ok(())
    }

    /// This process's rank and the number of ranks.
    pub fn rank(&self) -> (usize, usize) {
        (self.collective.rank(), self.collective.world_size())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) {
        self.collective.barrier();
    }

    /// The next micro-step draws the dropout masks of micro-step number `micro_step` (counted from 0 over the
    /// whole run) of a model created with `seed`, and the ones after it follow on: a run resumed from a
    /// checkpoint draws the masks the run it resumes would have drawn, whatever the weights were loaded from.
    pub fn set_dropout_stream(&mut self, seed: u64, micro_step: u64) {
        self.dropout_seed = dropout_seed_for(seed) ^ rank_stream(self.collective.rank());
        self.micro_steps = micro_step;
    }

    /// Whether the backward passes of the micro-steps that follow average the gradients over the ranks
    /// as they finish them, layer by layer beside the rest of the pass, instead of [`Engine::step`]
    /// averaging them all after it: set it for the last micro-step before each step, as nanoGPT sets
    /// DDP's `require_backward_grad_sync`. The GPU step over a collective with a device path (NCCL) does
    /// so; elsewhere `step` averages them. Under ZeRO-1 only that last micro-step may: another after it
    /// is refused.
    pub fn set_backward_grad_sync(&mut self, sync: bool) {
        self.backward_grad_sync = sync;
    }

    /// Whether `flag` is set on any rank: every rank gets the same answer.
    pub fn any_rank(&mut self, flag: bool) -> bool {
        self.collective.any_rank(flag)
    }

    /// ZeRO stage 1 (`stage` 1) or none (0): with 1, each rank of a data-parallel run keeps AdamW's
    /// moments for its own shard of the parameters only, 1/world_size of them. The gradients are then
    /// reduce-scattered instead of all-reduced, each rank updates its shard, and the weights are
    /// all-gathered: the same bytes as an all-reduce, and the same step. Set before the optimizer.
    pub fn set_zero_stage(&mut self, stage: u32) -> Result<()> {
        if stage > 1 {
            candle_core::bail!("zero_stage must be 0 (off) or 1 (AdamW state sharded over the ranks), got {stage}");
        }
        if self.optimizer_configured() {
            candle_core::bail!("set zero_stage before configuring the optimizer");
        }
        if stage == 1 && self.flat.is_none() && self.gpu_step.is_none() && !self.trains_on_fused_cuda_step() {
            candle_core::bail!(
                "zero_stage=1 shards the AdamW state of the explicit training steps only (float32 on the CPU, float32 or bfloat16 on a GPU), not of candle's graph (float16, or NANOGPT_CUDA_STEP=graph); change dtype, or set zero_stage=0"
            );
        }
        self.zero_stage = stage;
        Ok(())
    }

    /// Under ZeRO-1, brings every rank's shard of the AdamW state to rank 0, where the next checkpoint
    /// saves it whole; every rank must call it, and it does nothing otherwise.
    pub fn gather_optimizer_state(&mut self) -> Result<()> {
        const UNCONFIGURED: &str = "configure the optimizer before training";
        if let Some(gpu_step) = self.gpu_step.as_mut() {
            let args = gpu_step.optimizer.clone().ok_or_else(|| candle_core::Error::Msg(UNCONFIGURED.into()))?;
            let step = gpu_step.step.get_mut().expect("no panic while holding the GPU step");
            let len = step.layout().len;
            if step.shard() == (0..len) {
                return Ok(());
            }
            let (exp_avg, exp_avg_sq, steps) = step.read_optimizer_state()?;
            gpu_step.gathered_optimizer = gather_moments(self.collective.as_mut(), len, [&exp_avg, &exp_avg_sq])
                .map(|[exp_avg, exp_avg_sq]| FlatAdamW::from_moments(args, exp_avg, exp_avg_sq, steps));
            return Ok(());
        }
        let Some(flat) = self.flat.as_mut() else { return Ok(()) };
        let Some(optimizer) = flat.optimizer.as_ref() else { candle_core::bail!("{UNCONFIGURED}") };
        let len = flat.layout.len;
        if optimizer.shard() == (0..len) {
            return Ok(());
        }
        let (exp_avg, exp_avg_sq, steps) = optimizer.moments();
        flat.gathered_optimizer = gather_moments(self.collective.as_mut(), len, [exp_avg, exp_avg_sq])
            .map(|[exp_avg, exp_avg_sq]| FlatAdamW::from_moments(optimizer.args().clone(), exp_avg, exp_avg_sq, steps));
        Ok(())
    }

    /// The device the model is on.
    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// The candle model with the current weights (refreshed from the training step's if they moved).
    pub fn model(&self) -> &Gpt {
        self.sync_model().expect("the flat parameters match the model's shapes");
        &self.model
    }

    pub fn num_params(&self, non_embedding: bool) -> usize {
        self.model.num_params(non_embedding)
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.model.named_parameters().into_iter().map(|(n, v)| (n, v.clone())).collect()
    }

    pub fn configure_optimizer(&mut self, args: &OptimizerArgs) -> Result<ParamGroups> {
        self.start_fused_cuda_step()?;
        let (rank, world_size) = (self.collective.rank(), self.collective.world_size());
        if let Some(gpu_step) = self.gpu_step.as_mut() {
            gpu_step.optimizer = Some(args.clone());
            let step = gpu_step.step.get_mut().expect("no panic while holding the GPU step");
            if self.zero_stage == 1 {
                step.shard_optimizer(collective::shard(step.layout().len, world_size, rank))?;
            }
            return Ok(FlatAdamW::groups(step.layout()));
        }
        if let Some(flat) = self.flat.as_mut() {
            let shard = if self.zero_stage == 1 { collective::shard(flat.layout.len, world_size, rank) } else { 0..flat.layout.len };
            flat.optimizer = Some(FlatAdamW::for_shard(args.clone(), shard));
            return Ok(FlatAdamW::groups(&flat.layout));
        }
        if self.zero_stage == 1 && world_size > 1 {
            candle_core::bail!(
                "zero_stage=1 shards the AdamW state of the explicit training steps only, and this run trains on candle's graph (float16, or NANOGPT_CUDA_STEP=graph); change dtype, or set zero_stage=0"
            );
        }
        let optimizer = AdamW::new(self.params(), args.clone())?;
        let groups = optimizer.groups();
        self.optimizer = Some(optimizer);
        Ok(groups)
    }

    pub fn load_optimizer(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_optimizer_state(&load_safetensors(bytes, "optimizer state")?)
    }

    /// The AdamW moments and step count from tensors named as [`Engine::optimizer_state`] writes them.
    fn load_optimizer_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        const UNCONFIGURED: &str = "configure the optimizer before training";
        if let Some(gpu_step) = self.gpu_step.as_mut() {
            let args = gpu_step.optimizer.clone().ok_or_else(|| candle_core::Error::Msg(UNCONFIGURED.into()))?;
            gpu_step.gathered_optimizer = None;
            let mut step = gpu_step.step();
            let mut staged = FlatAdamW::new(step.layout(), args);
            staged.load_state(step.layout(), tensors)?;
            let (exp_avg, exp_avg_sq, steps) = staged.moments();
            let shard = step.shard();
            return step.load_optimizer_state(&exp_avg[shard.clone()], &exp_avg_sq[shard], steps);
        }
        match self.flat.as_mut() {
            Some(flat) => {
                flat.gathered_optimizer = None;
                flat.optimizer.as_mut().ok_or_else(|| candle_core::Error::Msg(UNCONFIGURED.into()))?.load_state(&flat.layout, tensors)
            }
            None => self.optimizer.as_mut().ok_or_else(|| candle_core::Error::Msg(UNCONFIGURED.into()))?.load_state(tensors),
        }
    }

    /// Replaces the weights from tensors named as in nanoGPT's state dict, checking names and shapes.
    fn load_weights(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.weights_changing();
        self.sync_model()?;
        self.model.load(tensors)?;
        if let Some(flat) = self.flat.as_mut() {
            copy_from_model(&flat.layout, &mut flat.params, &self.model)?;
        }
        if let Some(gpu_step) = self.gpu_step.as_ref() {
            let step = gpu_step.step();
            let mut params = vec![0f32; step.layout().len];
            copy_from_model(step.layout(), &mut params, &self.model)?;
            step.load_params(&params)?;
        }
        Ok(())
    }

    /// Checks a batch of `batch_size` rows of inputs `x` and targets `y`; returns the row length T.
    fn check_batch(&self, x: &[u32], y: &[i32], batch_size: usize) -> Result<usize> {
        if batch_size == 0 || x.is_empty() || x.len() != y.len() || !x.len().is_multiple_of(batch_size) {
            candle_core::bail!(
                "a batch needs inputs and targets of equal length divisible by batch_size ({} and {} for {batch_size} rows)",
                x.len(),
                y.len()
            );
        }
        let t = x.len() / batch_size;
        let vocab = self.model.args.vocab_size;
        if let Some(bad) = x.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("token id {bad} is out of range for vocab_size {vocab}");
        }
        if let Some(bad) = y.iter().find(|&&id| id < -1 || id as i64 >= vocab as i64) {
            candle_core::bail!("target {bad} is out of range for vocab_size {vocab} (-1 marks ignored positions)");
        }
        if t > self.model.args.block_size {
            candle_core::bail!("cannot forward a sequence of length {t}: block size is only {}", self.model.args.block_size);
        }
        Ok(t)
    }

    fn batch(&self, x: &[u32], y: &[i32], batch_size: usize) -> Result<(Tensor, Tensor)> {
        let t = self.check_batch(x, y, batch_size)?;
        let device = self.model.device();
        let x = Tensor::from_slice(x, (batch_size, t), device)?;
        // Widened on the host: candle's CUDA backend has no i32 -> i64 cast.
        let y: Vec<i64> = y.iter().map(|&v| v as i64).collect();
        let y = Tensor::from_vec(y, (batch_size, t), device)?;
        Ok((x, y))
    }

    /// Forward and backward on one micro-batch; adds `loss_scale` times the gradient to the
    /// accumulated gradients and returns the (unscaled) mean loss.
    pub fn forward_backward(&mut self, x: &[u32], y: &[i32], batch_size: usize, loss_scale: f64) -> Result<f32> {
        self.accumulate(x, y, batch_size, loss_scale)?;
        self.last_loss()
    }

    /// [`Engine::forward_backward`] without reading the loss back, so that on a GPU the host queues
    /// the next micro-step while this one runs; [`Engine::last_loss`] reads it when it is wanted (as
    /// nanoGPT calls `loss.item()` only at `log_interval`).
    pub fn accumulate(&mut self, x: &[u32], y: &[i32], batch_size: usize, loss_scale: f64) -> Result<()> {
        let key = DropoutKey { seed: self.dropout_seed, step: self.micro_steps };
        self.micro_steps += 1;
        let loss = if self.flat.is_some() {
            PendingLoss::Value(self.flat_forward_backward(x, y, batch_size, loss_scale, key)?)
        } else if self.gpu_step.is_some() {
            self.gpu_forward_backward(x, y, batch_size, loss_scale, key)?;
            PendingLoss::GpuStep
        } else {
            PendingLoss::Tensor(self.graph_forward_backward(x, y, batch_size, loss_scale, key)?)
        };
        *self.last_loss.get_mut().expect("no panic while holding the loss") = Some(loss);
        Ok(())
    }

    /// The mean loss of the last micro-step: waits for the device to finish it.
    pub fn last_loss(&self) -> Result<f32> {
        match &*self.last_loss.lock().expect("no panic while holding the loss") {
            Some(PendingLoss::Value(loss)) => Ok(*loss),
            Some(PendingLoss::Tensor(loss)) => loss.to_scalar::<f32>(),
            Some(PendingLoss::GpuStep) => self.gpu_step.as_ref().expect("a GPU step's loss").step().read_loss(),
            None => candle_core::bail!("no loss yet: run forward_backward first"),
        }
    }

    /// [`Engine::forward_backward`] through candle's graph; returns the loss, still on the device.
    fn graph_forward_backward(&mut self, x: &[u32], y: &[i32], batch_size: usize, loss_scale: f64, key: DropoutKey) -> Result<Tensor> {
        let start = self.mark();
        let (x, y) = self.batch(x, y, batch_size)?;
        let data_ms = self.lap(start)?;
        let start = self.mark();
        let loss = self.model.loss(&x, &y, &Mode::Train(key))?;
        let forward_ms = self.lap(start)?;
        let start = self.mark();
        // Scaling the loss scales every gradient, at the cost of one scalar op.
        let loss_scale = loss_scale * self.loss_scale();
        let scaled = if loss_scale == 1.0 { loss.clone() } else { loss.affine(loss_scale, 0.0)? };
        let mut store = scaled.backward()?;
        let mut grads = Vec::new();
        for (name, var) in self.model.named_parameters() {
            let g = store.remove(var.as_tensor()).ok_or_else(|| candle_core::Error::Msg(format!("no gradient reached `{name}`")))?;
            grads.push(g);
        }
        self.grads = Some(match self.grads.take() {
            None => grads,
            Some(acc) => acc.iter().zip(&grads).map(|(a, g)| a + g).collect::<Result<_>>()?,
        });
        let backward_ms = self.lap(start)?;
        if let (Some(p), Some(data_ms), Some(forward_ms), Some(backward_ms)) = (self.profile.as_mut(), data_ms, forward_ms, backward_ms) {
            (p.data_ms, p.forward_ms, p.backward_ms) = (data_ms, forward_ms, backward_ms);
        }
        // Detached: the graph behind the loss (every activation) is freed now, not when the loss is read.
        Ok(loss.detach())
    }

    /// [`Engine::forward_backward`] on the explicit CPU step.
    fn flat_forward_backward(&mut self, x: &[u32], y: &[i32], batch_size: usize, loss_scale: f64, key: DropoutKey) -> Result<f32> {
        let start = self.mark();
        let t = self.check_batch(x, y, batch_size)?;
        let data_ms = self.lap(start)?;
        let args = &self.model.args;
        let dropout = (args.dropout > 0.0).then_some((key, args.dropout as f32));
        let flat = self.flat.as_mut().expect("on the flat path");
        let acts =
            FlatTrainer::activations(flat.activations.get_mut().expect("no panic while holding the activations"), args, batch_size, t);
        let start = self.profile.is_some().then(std::time::Instant::now);
        train_step::forward(args, &flat.layout, &flat.params, acts, x, dropout);
        let loss = train_step::loss(args, acts, y, Some(loss_scale))?;
        let forward_ms = start.map(|s| s.elapsed().as_secs_f64() * 1e3);
        let start = self.profile.is_some().then(std::time::Instant::now);
        if flat.grads.len() != flat.layout.len {
            flat.grads = vec![0f32; flat.layout.len];
        }
        train_step::backward(args, &flat.layout, &flat.params, &mut flat.grads, acts, x, dropout, flat.has_grads);
        flat.has_grads = true;
        let backward_ms = start.map(|s| s.elapsed().as_secs_f64() * 1e3);
        if let (Some(p), Some(data_ms), Some(forward_ms), Some(backward_ms)) = (self.profile.as_mut(), data_ms, forward_ms, backward_ms) {
            (p.data_ms, p.forward_ms, p.backward_ms) = (data_ms, forward_ms, backward_ms);
        }
        Ok(loss)
    }

    /// [`Engine::forward_backward`] on the explicit GPU step; the loss stays in the step's buffer.
    /// Profiling waits for the GPU after each phase by reading something back.
    fn gpu_forward_backward(&mut self, x: &[u32], y: &[i32], batch_size: usize, loss_scale: f64, key: DropoutKey) -> Result<()> {
        let start = self.mark();
        let t = self.check_batch(x, y, batch_size)?;
        let data_ms = self.lap(start)?;
        let args = &self.model.args;
        let dropout = (args.dropout > 0.0).then_some((key, args.dropout as f32));
        let gpu_step = self.gpu_step.as_mut().expect("on the GPU step");
        let mut step = gpu_step.step.lock().expect("no panic while holding the GPU step");
        // Under ZeRO-1 a rank's mean holds only its own shard, so adding more gradients to it would mix
        // means and local sums: one micro-step per optimizer step may average.
        if gpu_step.grads_averaged && step.shard() != (0..step.layout().len) {
            candle_core::bail!(
                "zero_stage=1 averages the gradients once per optimizer step, and this micro-step follows one that did; set_backward_grad_sync only on the last micro-step before step"
            );
        }
        if !gpu_step.has_grads {
            step.zero_grads()?;
        }
        let start = self.profile.is_some().then(std::time::Instant::now);
        step.forward(x, batch_size, t, dropout)?;
        step.loss(y, Some(loss_scale))?;
        if start.is_some() {
            step.read_loss()?;
        }
        let forward_ms = start.map(|s| s.elapsed().as_secs_f64() * 1e3);
        let start = self.profile.is_some().then(std::time::Instant::now);
        // Each finished range's mean over the ranks starts while the rest of the backward pass runs. A
        // collective without a device path declines the first, and `step` averages them all instead.
        // Under ZeRO-1 each range goes only to the ranks whose shards hold it.
        let (sync, grads, len) = (self.backward_grad_sync, step.grads_addr(), step.layout().len);
        let sharded = step.shard() != (0..len);
        let collective = &mut self.collective;
        let mut averaging = sync;
        step.backward(dropout, &mut |range| {
            if averaging {
                averaging = match sharded {
                    true => collective.start_reduce_scatter_mean_device(grads, len, range)?,
                    false => collective.start_mean_device(grads + (range.start * 4) as u64, range.len())?,
                };
            }
            Ok(())
        })?;
        if sync {
            collective.finish_device_means()?;
        }
        gpu_step.has_grads = true;
        gpu_step.grads_averaged = averaging;
        if start.is_some() {
            step.read_grad_norm()?;
        }
        let backward_ms = start.map(|s| s.elapsed().as_secs_f64() * 1e3);
        drop(step);
        if let (Some(p), Some(data_ms), Some(forward_ms), Some(backward_ms)) = (self.profile.as_mut(), data_ms, forward_ms, backward_ms) {
            (p.data_ms, p.forward_ms, p.backward_ms) = (data_ms, forward_ms, backward_ms);
        }
        Ok(())
    }

    /// [`Engine::step`] on the explicit GPU step: clipping and AdamW run on the device; the gradient
    /// norm is read back for the log. Several ranks average the flat gradients on the device (NCCL), or
    /// through host memory where their collective has no device path. Under ZeRO-1 each rank averages,
    /// clips and updates its shard, and the ranks then exchange the updated shards, all on the device.
    fn gpu_step_update(&mut self, lr: f64) -> Result<StepStats> {
        let gpu_step = self.gpu_step.as_mut().expect("on the GPU step");
        if !gpu_step.has_grads {
            candle_core::bail!("no gradients to apply: run forward_backward first");
        }
        let args = gpu_step.optimizer.clone().ok_or_else(|| candle_core::Error::Msg("configure the optimizer before training".into()))?;
        let mut step = gpu_step.step.lock().expect("no panic while holding the GPU step");
        let len = step.layout().len;
        let sharded = step.shard() != (0..len);
        let collective = &mut self.collective;
        let on_device = |done: bool| {
            match done {
            true => Ok(()),
            false => Err(candle_core::Error::Msg(
                "zero_stage=1 on the GPU step exchanges shards on the device, which this collective cannot; train the ranks over NCCL (--device=cuda), or set zero_stage=0".into(),
            )),
        }
        };
        if !gpu_step.grads_averaged {
            if sharded {
                on_device(collective.start_reduce_scatter_mean_device(step.grads_addr(), len, 0..len)?)?;
                collective.finish_device_means()?;
            } else if !collective.all_reduce_mean_device(step.grads_addr(), len)? {
                let mut grads = step.read_grads()?;
                collective.all_reduce_mean(&mut grads);
                step.load_grads(&grads)?;
            }
        }
        step.optimizer_step(&args, lr, &mut |norm_squared| match sharded {
            true => on_device(collective.all_reduce_sum_device(norm_squared, 1)?),
            false => Ok(()),
        })?;
        if sharded {
            on_device(collective.all_gather_device(step.params_addr(), len)?)?;
            step.params_written()?;
        }
        gpu_step.gathered_optimizer = None;
        // The first wait for the device since the gradients' means were queued: where a rank that hangs holds the others.
        let mut grad_norm = 0.0;
        collective.wait_for_device(&mut || {
            grad_norm = step.read_grad_norm()? as f64;
            Ok(())
        })?;
        (gpu_step.has_grads, gpu_step.grads_averaged) = (false, false);
        self.model_stale.store(true, Ordering::Release);
        // The per-tensor update ratios are not computed on the device.
        Ok(StepStats { grad_norm, clipped: args.grad_clip > 0.0 && grad_norm > args.grad_clip, update_ratios: Vec::new(), skipped: false })
    }

    /// Applies the accumulated gradients (clipped if configured) at learning rate `lr`, then clears them.
    pub fn step(&mut self, lr: f64) -> Result<StepStats> {
        self.weights_changing();
        let start = self.mark();
        if self.gpu_step.is_some() {
            let stats = self.gpu_step_update(lr)?;
            if let Some(optimizer_ms) = self.lap(start)? {
                self.profile.as_mut().expect("profiling is on").optimizer_ms = optimizer_ms;
            }
            return Ok(stats);
        }
        if let Some(flat) = self.flat.as_mut() {
            if !flat.has_grads {
                candle_core::bail!("no gradients to apply: run forward_backward first");
            }
            let optimizer =
                flat.optimizer.as_mut().ok_or_else(|| candle_core::Error::Msg("configure the optimizer before training".into()))?;
            // As DDP: the clip and AdamW see the mean over all ranks' gradients. Under ZeRO-1 each rank
            // needs only its shard's, and sends the others' to their owners.
            let collective = &mut self.collective;
            let sharded = optimizer.shard() != (0..flat.layout.len);
            if sharded {
                collective.reduce_scatter_mean(&mut flat.grads);
            } else {
                collective.all_reduce_mean(&mut flat.grads);
            }
            let stats = optimizer.step_shard(&flat.layout, &mut flat.params, &flat.grads, lr, &mut |sums| collective.all_reduce_sum(sums));
            if sharded {
                collective.all_gather(&mut flat.params);
            }
            flat.gathered_optimizer = None;
            flat.has_grads = false;
            self.model_stale.store(true, Ordering::Release);
            if let Some(optimizer_ms) = self.lap(start)? {
                self.profile.as_mut().expect("profiling is on").optimizer_ms = optimizer_ms;
            }
            return Ok(stats);
        }
        let mut grads =
            self.grads.take().ok_or_else(|| candle_core::Error::Msg("no gradients to apply: run forward_backward first".into()))?;
        // As DDP: the clip, the float16 overflow check and AdamW see the mean over all ranks' gradients.
        self.collective.all_reduce_mean_tensors(&mut grads)?;
        let optimizer = self.optimizer.as_mut().ok_or_else(|| candle_core::Error::Msg("configure the optimizer before training".into()))?;
        let stats = match self.scaler.as_mut() {
            Some(scaler) => optimizer.step_scaled(&grads, lr, scaler)?,
            None => optimizer.step(&grads, lr)?,
        };
        if let Some(optimizer_ms) = self.lap(start)? {
            self.profile.as_mut().expect("profiling is on").optimizer_ms = optimizer_ms;
        }
        Ok(stats)
    }

    /// Mean loss of one batch in evaluation mode.
    pub fn eval_loss(&self, x: &[u32], y: &[i32], batch_size: usize) -> Result<f32> {
        if let Some(gpu_step) = self.gpu_step.as_ref() {
            let t = self.check_batch(x, y, batch_size)?;
            // The evaluation's loss goes where the last micro-step's waits to be read: read that one first.
            let mut last_loss = self.last_loss.lock().expect("no panic while holding the loss");
            if matches!(*last_loss, Some(PendingLoss::GpuStep)) {
                *last_loss = Some(PendingLoss::Value(gpu_step.step().read_loss()?));
            }
            let mut step = gpu_step.step();
            step.forward(x, batch_size, t, None)?;
            step.loss(y, None)?;
            return step.read_loss();
        }
        if let Some(flat) = self.flat.as_ref() {
            let t = self.check_batch(x, y, batch_size)?;
            let mut slot = flat.activations.lock().expect("no panic while holding the activations");
            let acts = FlatTrainer::activations(&mut slot, &self.model.args, batch_size, t);
            train_step::forward(&self.model.args, &flat.layout, &flat.params, acts, x, None);
            return train_step::loss(&self.model.args, acts, y, None);
        }
        let (x, y) = self.batch(x, y, batch_size)?;
        self.model.loss(&x, &y, &Mode::Eval)?.to_scalar::<f32>()
    }

    /// The prompt followed by `args.max_new_tokens` tokens sampled with `args.seed`.
    pub fn generate(&self, prompt: &[u32], args: &SampleArgs) -> Result<Vec<u32>> {
        Ok(self.generate_batch(prompt, &[args.seed], args)?.remove(0))
    }

    /// One sequence per seed, each the prompt followed by `args.max_new_tokens` tokens sampled with its own
    /// seed (`args.seed` is not used), each what [`Engine::generate`] gives for that seed. On the CPU, and on a
    /// GPU in float32 and bfloat16, they decode together as one batch.
    pub fn generate_batch(&self, prompt: &[u32], seeds: &[u64], args: &SampleArgs) -> Result<Vec<Vec<u32>>> {
        if let Some(flat) = self.flat.as_ref() {
            return decode::generate(flat.weights(&self.model.args), prompt, seeds, args);
        }
        if let Some(mut generation) = self.gpu_generation(prompt, seeds, args)? {
            for _ in 0..args.max_new_tokens {
                generation.next_tokens()?;
            }
            return Ok(generation.into_sequences());
        }
        let model = self.synced_model()?;
        seeds.iter().map(|&seed| sample::generate(model, prompt, &SampleArgs { seed, ..args.clone() })).collect()
    }

    /// On a CUDA device, sequences to decode on its kernels (decode_cuda.rs) from a copy of the weights in
    /// the compute precision; None where candle's graph samples instead: in float16, which the kernels do not
    /// have, with `NANOGPT_CUDA_STEP=graph`, and off CUDA.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn gpu_generation(&self, prompt: &[u32], seeds: &[u64], args: &SampleArgs) -> Result<Option<CudaGeneration>> {
        let dtype = self.model.compute_dtype();
        if !self.model.device().is_cuda() || self.cuda_step == CudaStep::Graph || dtype == DType::F16 {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        {
            let model = self.synced_model()?;
            let x = gpu_step_precision(dtype)?;
            let gpu: Arc<dyn Gpu + Send + Sync> = Arc::new(cuda::Kernels::new(model.device())?);
            let mut cached = self.gpu_weights.lock().expect("no panic while holding the GPU weights");
            let weights = match cached.as_ref() {
                Some((precision, weights)) if *precision == x => weights.clone(),
                _ => {
                    let layout = ParamLayout::new(&model.args);
                    let mut params = vec![0f32; layout.len];
                    copy_from_model(&layout, &mut params, model)?;
                    let weights = crate::decode_cuda::upload_weights(&gpu, x, &params)?;
                    *cached = Some((x, weights.clone()));
                    weights
                }
            };
            Ok(Some(CudaGeneration::new(gpu, &model.args, x, weights, prompt, seeds, args)?))
        }
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("a CUDA device in a build without CUDA cannot sample on its kernels")
    }

    /// Starts sequences (one per seed) to be drawn token by token with [`Engine::next_tokens`]; the tokens
    /// are those [`Engine::generate_batch`] gives. Training steps end it.
    pub fn start_sampling(&mut self, prompt: &[u32], seeds: &[u64], temperature: f64, top_k: Option<usize>) -> Result<()> {
        let args = SampleArgs { max_new_tokens: 0, temperature, top_k, seed: 0 };
        self.sampling = Some(match (self.flat.as_ref(), self.gpu_generation(prompt, seeds, &args)?) {
            (Some(flat), _) => Sampling::Decoder(Box::new(decode::Generation::new(flat.weights(&self.model.args), prompt, seeds, &args)?)),
            (None, Some(generation)) => Sampling::Gpu(Box::new(generation)),
            (None, None) => {
                let model = self.synced_model()?;
                Sampling::Graph(seeds.iter().map(|&seed| Sampler::new(model, prompt, temperature, top_k, seed)).collect::<Result<_>>()?)
            }
        });
        Ok(())
    }

    /// The next token of every sequence [`Engine::start_sampling`] began.
    pub fn next_tokens(&mut self) -> Result<Vec<u32>> {
        match (self.sampling.as_mut(), self.flat.as_ref()) {
            (Some(Sampling::Decoder(generation)), Some(flat)) => Ok(generation.next_tokens(flat.weights(&self.model.args)).to_vec()),
            (Some(Sampling::Gpu(generation)), _) => Ok(generation.next_tokens()?.to_vec()),
            // Without the flat step the candle model holds the weights itself.
            (Some(Sampling::Graph(samplers)), None) => samplers.iter_mut().map(|s| s.next_token(&self.model)).collect(),
            _ => candle_core::bail!("no generation to continue: call start_sampling first (training steps end a generation)"),
        }
    }

    /// The weights, named as in nanoGPT's state dict.
    fn weights(&self) -> Result<Vec<(String, Tensor)>> {
        match self.flat.as_ref() {
            Some(flat) => named(&flat.layout, &flat.params),
            None => Ok(self.synced_model()?.named_parameters().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()),
        }
    }

    /// Writes the weights as a safetensors file to `out`.
    pub fn save_weights(&self, out: &mut impl Write) -> Result<()> {
        write_safetensors(self.weights()?, None, out)
    }

    /// Writes the weights as a Hugging Face GPT-2 `model.safetensors` to `out`.
    pub fn export_hf(&self, out: &mut impl Write) -> Result<()> {
        write_safetensors(hf::export_tensors(self.synced_model()?)?, Some(hf_metadata()), out)
    }

    /// The Hugging Face GPT-2 `config.json` that goes with [`Engine::export_hf`].
    pub fn hf_config(&self) -> String {
        hf::export_config(&self.model.args)
    }

    /// The gradients accumulated since the last step, named as the parameters (for inspection and checks).
    fn gradients(&self) -> Result<Vec<(String, Tensor)>> {
        if !self.has_grads() {
            candle_core::bail!("no gradients: run forward_backward first");
        }
        if let Some(flat) = self.flat.as_ref() {
            return named(&flat.layout, &flat.grads);
        }
        if let Some(gpu_step) = self.gpu_step.as_ref() {
            let step = gpu_step.step();
            return named(step.layout(), &step.read_grads()?);
        }
        let grads = self.grads.as_ref().ok_or_else(|| candle_core::Error::Msg("no gradients: run forward_backward first".into()))?;
        Ok(self.model.named_parameters().into_iter().map(|(n, _)| n).zip(grads.iter().cloned()).collect())
    }

    /// Writes the gradients as a safetensors file to `out`.
    pub fn save_gradients(&self, out: &mut impl Write) -> Result<()> {
        write_safetensors(self.gradients()?, None, out)
    }

    fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>> {
        let none = || candle_core::Error::Msg("no optimizer to save".into());
        if let Some(gpu_step) = self.gpu_step.as_ref() {
            let args = gpu_step.optimizer.clone().ok_or_else(none)?;
            let step = gpu_step.step();
            if let Some(gathered) = gpu_step.gathered_optimizer.as_ref() {
                return gathered.state(step.layout());
            }
            let (exp_avg, exp_avg_sq, steps) = step.read_optimizer_state()?;
            return FlatAdamW::from_moments(args, exp_avg, exp_avg_sq, steps).state(step.layout());
        }
        match self.flat.as_ref() {
            Some(flat) => flat.gathered_optimizer.as_ref().or(flat.optimizer.as_ref()).ok_or_else(none)?.state(&flat.layout),
            None => self.optimizer.as_ref().ok_or_else(none)?.state(),
        }
    }

    /// Writes the AdamW state (moments and step) as a safetensors file to `out`.
    pub fn save_optimizer(&self, out: &mut impl Write) -> Result<()> {
        write_safetensors(self.optimizer_state()?, None, out)
    }
}

/// ZeRO-1's checkpoint: every rank's [`collective::shard`] of AdamW's two moments (`mine`, this rank's), each
/// broadcast by its owner, put together on rank 0, which returns them whole; the other ranks return None.
fn gather_moments(collective: &mut dyn Collective, len: usize, mine: [&[f32]; 2]) -> Option<[Vec<f32>; 2]> {
    let (rank, world_size) = (collective.rank(), collective.world_size());
    let mut whole = [vec![0f32; if rank == 0 { len } else { 0 }], vec![0f32; if rank == 0 { len } else { 0 }]];
    for (mine, whole) in mine.into_iter().zip(whole.iter_mut()) {
        for owner in 0..world_size {
            let owned = collective::shard(len, world_size, owner);
            let mut part = if owner == rank { mine.to_vec() } else { vec![0f32; owned.len()] };
            collective.broadcast(&mut part, owner);
            if rank == 0 {
                whole[owned].copy_from_slice(&part);
            }
        }
    }
    (rank == 0).then_some(whole)
}

/// transformers refuses safetensors files that do not say they hold PyTorch tensors.
fn hf_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

fn on_cpu(tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    tensors.into_iter().map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?))).collect()
}

/// Writes `tensors` as a safetensors file to `out`, one tensor at a time: the bytes
/// `safetensors::serialize` makes, without holding them all (the crate streams only to a path).
fn write_safetensors(tensors: Vec<(String, Tensor)>, metadata: Option<HashMap<String, String>>, out: &mut impl Write) -> Result<()> {
    use safetensors::tensor::{Metadata, TensorInfo};
    use safetensors::View;
    let invalid = |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("cannot serialize: {e}"));
    let mut tensors = on_cpu(tensors)?;
    // The crate's order: by descending dtype alignment, then by name.
    tensors.sort_by(|(a_name, a), (b_name, b)| View::dtype(b).cmp(&View::dtype(a)).then(a_name.cmp(b_name)));
    let mut offset = 0;
    let infos = tensors
        .iter()
        .map(|(name, t)| {
            let data_offsets = (offset, offset + View::data_len(t));
            offset = data_offsets.1;
            (name.clone(), TensorInfo { dtype: View::dtype(t), shape: t.dims().to_vec(), data_offsets })
        })
        .collect();
    let metadata = Metadata::new(metadata, infos).map_err(|e| invalid(&e))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| invalid(&e))?;
    // The tensor data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, t) in &tensors {
        out.write_all(&View::data(t))?;
    }
    Ok(())
}

fn load_safetensors(bytes: &[u8], what: &str) -> Result<HashMap<String, Tensor>> {
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| candle_core::Error::Msg(format!("the {what} are not a valid safetensors file ({e})")))?;
    float_tensors(&tensors)
}

/// The floating-point tensors: every weight and optimizer moment is one. Others are buffers no model here uses
/// (e.g. GPT-2 files hold their causal masks `attn.bias` as BOOL), skipped whatever their dtype.
fn float_tensors(tensors: &safetensors::SafeTensors) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    use safetensors::Dtype;
    tensors
        .iter()
        .filter(|(_, view)| matches!(view.dtype(), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64))
        .map(|(name, view)| Ok((name.to_string(), view.load(&Device::Cpu)?)))
        .collect()
}

/// nanoGPT's `ckpt.pt` (see [`crate::torch_checkpoint`]), read from bytes (a mapped file, [`crate::files::map`],
/// for the native engine: a GPT-2 XL checkpoint with its AdamW state is ~19 GB) and written to a sink.
impl Engine {
    /// A model with `args` (e.g. the checkpoint's, with another dropout) and the weights of a `ckpt.pt`.
    pub fn from_nanogpt_checkpoint(args: &ModelArgs, bytes: &[u8], device_name: &str) -> Result<Self> {
        configure_cpu_runtime();
        let mut engine = Self::wrap(Gpt::empty(args, &device(device_name, 0)?)?, 0)?;
        engine.load_weights(&TorchCheckpoint::read(bytes)?.weights(&engine.model)?)?;
        Ok(engine)
    }

    /// The AdamW state of a `ckpt.pt`, into the optimizer configured before; a checkpoint saved before the
    /// first step has none and leaves the fresh state.
    pub fn load_nanogpt_optimizer(&mut self, bytes: &[u8]) -> Result<()> {
        match TorchCheckpoint::read(bytes)?.optimizer_state(&self.model)? {
            Some(state) => self.load_optimizer_state(&state),
            None => Ok(()),
        }
    }

    /// Writes a `ckpt.pt` of this model, its optimizer state if configured, and `info` (whose
    /// `model_args` are replaced by the model's own) to `out`.
    pub fn save_nanogpt_checkpoint(&self, out: &mut (impl Write + Seek), info: &CheckpointInfo) -> Result<()> {
        let info = CheckpointInfo { model_args: self.model.args.clone(), ..info.clone() };
        let state = match self.optimizer_configured() {
            true => Some(self.optimizer_state()?.into_iter().collect::<HashMap<_, _>>()),
            false => None,
        };
        torch_checkpoint::write(out, self.synced_model()?, state.as_ref(), &info)
    }
}

/// The `model_args`, `iter_num`, `best_val_loss` and `config` of a `ckpt.pt`.
pub fn nanogpt_checkpoint_info(bytes: &[u8]) -> Result<CheckpointInfo> {
    TorchCheckpoint::read(bytes)?.info()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed writer must make the bytes the safetensors crate makes: every checkpoint depends on it.
    #[test]
    fn write_safetensors_matches_the_crate() -> Result<()> {
        let tensors = vec![
            ("wte.weight".to_string(), Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?),
            ("h.0.ln_1.bias".to_string(), Tensor::new(&[1.5f32, -2.], &Device::Cpu)?),
            ("step".to_string(), Tensor::new(&[7f64], &Device::Cpu)?),
            ("half".to_string(), Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?.to_dtype(DType::F16)?),
        ];
        for metadata in [None, Some(hf_metadata())] {
            let mut streamed = Vec::new();
            write_safetensors(tensors.clone(), metadata.clone(), &mut streamed)?;
            assert_eq!(streamed, safetensors::serialize(tensors.clone(), metadata).unwrap());
        }
        Ok(())
    }
}
