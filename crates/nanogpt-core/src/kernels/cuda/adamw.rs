//! The optimizer step on the device (`adamw.cu`), as `optim::FlatAdamW` on the CPU: the squared global
//! gradient norm into one device float, then one AdamW launch over the flat buffers (or ZeRO-1's shard of
//! them) that clips by that norm itself, decays only the tensors of rank >= 2, and writes the weights'
//! compute copy.

use std::ops::Range;

use candle_core::Result;

use super::{blocks_for, Arg, Gpu, Precision};
use crate::kernels::adamw::AdamWUpdate;
use crate::train_step::ParamLayout;

/// The size of the norm's scratch that fills an H100/H200: a partial per block, and two blocks of 1024
/// threads per SM fill its 132 SMs.
pub const GRAD_NORM_PARTIALS: usize = 2 * 132;

const NORM_THREADS: u32 = 1024;

/// `norm_squared` (one f32, written) = the sum of squares of `grads` (n f32), through `partials`
/// (scratch of `partial_count` f32, normally [`GRAD_NORM_PARTIALS`]): a grid of at most
/// `partial_count` blocks writes a partial sum each, one block adds them. No atomics: for a given
/// `partial_count` and `n` the additions, and so the result, are the same every run.
pub fn grad_norm_squared(gpu: &dyn Gpu, norm_squared: u64, partials: u64, partial_count: usize, grads: u64, n: usize) -> Result<()> {
    if n == 0 || partial_count == 0 || partial_count > 1024 {
        candle_core::bail!(
            "grad_norm_squared: {n} gradients into {partial_count} partial sums; both must be positive, the partials at most 1024"
        );
    }
    let blocks = n.div_ceil(NORM_THREADS as usize).min(partial_count) as u32;
    gpu.launch(
        "grad_norm_squared_partials",
        [blocks, 1, 1],
        [NORM_THREADS, 1, 1],
        0,
        &[Arg::Ptr(partials), Arg::Ptr(grads), Arg::I64(n as i64)],
    )?;
    let threads = (blocks as usize).next_multiple_of(32) as u32;
    gpu.launch(
        "grad_norm_squared_total",
        [1, 1, 1],
        [threads, 1, 1],
        0,
        &[Arg::Ptr(norm_squared), Arg::Ptr(partials), Arg::I32(blocks as i32)],
    )
}

/// Where each parameter tensor ends in the flat buffers and whether it decays (nanoGPT's groups:
/// rank >= 2), as host vectors for the caller to upload once; the kernel finds an element's tensor
/// by a binary search over `ends`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorTable {
    /// Exclusive end offsets, ascending (uploaded as i64).
    pub ends: Vec<i64>,
    /// 1 where the tensor decays, else 0 (uploaded as u8).
    pub decays: Vec<u8>,
}

impl TensorTable {
    pub fn new(layout: &ParamLayout) -> Self {
        let ends = layout.tensors.iter().map(|t| t.range.end as i64).collect();
        let decays = layout.tensors.iter().map(|t| t.decays() as u8).collect();
        Self { ends, decays }
    }

    /// The table once uploaded: `ends` and `decays` are the device addresses of copies of the two vectors.
    pub fn on_device(&self, ends: u64, decays: u64) -> DeviceTensorTable {
        DeviceTensorTable { ends, decays, tensors: self.ends.len(), len: self.ends.last().map_or(0, |&end| end as usize) }
    }
}

/// A [`TensorTable`] on the device, with the sizes the launch checks against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTensorTable {
    ends: u64,
    decays: u64,
    tensors: usize,
    len: usize,
}

/// The optimizer's flat f32 buffers on the device, laid out as the table's tensors: the weights and
/// their gradients, `len` elements each, the compute copy of the weights (of the launch's precision; 0
/// for none), and AdamW's two moments for the `shard` of them that the update covers (all of them, but
/// under ZeRO-1, where each rank updates its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatBuffers {
    pub params: u64,
    pub grads: u64,
    pub exp_avg: u64,
    pub exp_avg_sq: u64,
    pub params_copy: u64,
    pub len: usize,
    pub shard: Range<usize>,
}

/// Global-norm clipping on the device: the gradients are scaled by max_norm / (norm + 1e-6) when that
/// is below one, `norm` being the square root of the f32 at `grad_norm_squared` ([`grad_norm_squared`])
/// times the step's `grad_scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clip {
    pub grad_norm_squared: u64,
    pub max_norm: f32,
}

const UPDATE_THREADS: u32 = 512;

/// One AdamW step over `buffers.shard` in one launch: those elements of `params`, and the moments,
/// updated in place and of `params_copy` (when present) written with the new parameters in precision
/// `x`, from `grads` times `step.grad_scale` times the clip coefficient. `step.weight_decay` applies to
/// the tensors the table marks as decaying; `step_size` and `bias_correction2_sqrt` are as
/// [`AdamWUpdate`]'s. Nothing is read back to the host; an empty shard launches nothing.
pub fn update(
    gpu: &dyn Gpu,
    x: Precision,
    buffers: &FlatBuffers,
    table: &DeviceTensorTable,
    step: &AdamWUpdate,
    clip: Option<Clip>,
) -> Result<()> {
    if buffers.len == 0 || buffers.len != table.len {
        candle_core::bail!(
            "adamw: buffers of {} elements for tensors of {} in all; build both from one ParamLayout",
            buffers.len,
            table.len
        );
    }
    let shard = &buffers.shard;
    if shard.start > shard.end || shard.end > buffers.len {
        candle_core::bail!("adamw: the shard {shard:?} is not within the {} elements; take it from collective::shard", buffers.len);
    }
    if shard.is_empty() {
        return Ok(());
    }
    if shard.len().div_ceil(UPDATE_THREADS as usize) > i32::MAX as usize {
        candle_core::bail!("adamw: {} elements are more than one launch covers; split the buffers", shard.len());
    }
    if let Some(clip) = clip {
        if clip.max_norm.is_nan() || clip.max_norm <= 0.0 {
            candle_core::bail!("adamw: clipping to a norm of {}; pass a positive max norm, or no clipping", clip.max_norm);
        }
    }
    let (grad_norm_squared, max_norm) = clip.map_or((0, 0.0), |c| (c.grad_norm_squared, c.max_norm));
    let at = |buffer: u64, element_bytes: usize| if buffer == 0 { 0 } else { buffer + (shard.start * element_bytes) as u64 };
    let args = [
        Arg::Ptr(at(buffers.params, 4)),
        Arg::Ptr(at(buffers.grads, 4)),
        Arg::Ptr(buffers.exp_avg),
        Arg::Ptr(buffers.exp_avg_sq),
        Arg::Ptr(at(buffers.params_copy, x.size_in_bytes())),
        Arg::I64(shard.len() as i64),
        Arg::I64(shard.start as i64),
        Arg::Ptr(table.ends),
        Arg::Ptr(table.decays),
        Arg::I32(table.tensors as i32),
        Arg::F32(step.beta1 as f32),
        Arg::F32(step.beta2 as f32),
        Arg::F32(step.eps as f32),
        // As the CPU kernel: the factor in f64, then rounded once.
        Arg::F32((1.0 - step.lr * step.weight_decay) as f32),
        Arg::F32(step.step_size as f32),
        Arg::F32(step.bias_correction2_sqrt as f32),
        Arg::F32(step.grad_scale as f32),
        Arg::Ptr(grad_norm_squared),
        Arg::F32(max_norm),
    ];
    gpu.launch(&x.kernel("adamw"), [blocks_for(shard.len(), UPDATE_THREADS), 1, 1], [UPDATE_THREADS, 1, 1], 0, &args)
}

/// `copy` (n bf16) = `params` (n f32) rounded: the compute copy of weights that arrived from other ranks.
pub fn round_params_bf16(gpu: &dyn Gpu, copy: u64, params: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    gpu.launch(
        "round_params_bf16",
        [blocks_for(n, UPDATE_THREADS), 1, 1],
        [UPDATE_THREADS, 1, 1],
        0,
        &[Arg::Ptr(copy), Arg::Ptr(params), Arg::I64(n as i64)],
    )
}
