//! AdamW with nanoGPT's two parameter groups, global-norm clipping, and the learning-rate schedule.

use std::ops::Range;

use candle_core::{DType, Result, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::adamw::{ratio, AdamWUpdate};
use crate::train_step::ParamLayout;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct OptimizerArgs {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
}

/// nanoGPT's `get_lr` inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct LrSchedule {
    pub learning_rate: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub decay_lr: bool,
}

impl LrSchedule {
    /// Linear warmup from lr·1/(warmup+1), cosine decay to `min_lr` at `lr_decay_iters`, then constant.
    pub fn lr_at(&self, iter: u64) -> f64 {
        if !self.decay_lr {
            return self.learning_rate;
        }
        if iter < self.warmup_iters {
            return self.learning_rate * (iter + 1) as f64 / (self.warmup_iters + 1) as f64;
        }
        if iter > self.lr_decay_iters {
            return self.min_lr;
        }
        let ratio = (iter - self.warmup_iters) as f64 / (self.lr_decay_iters - self.warmup_iters).max(1) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.learning_rate - self.min_lr)
    }
}

/// Tensor and element counts of the two groups, for nanoGPT's start-up lines.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ParamGroups {
    pub decay_tensors: usize,
    pub decay_params: usize,
    pub no_decay_tensors: usize,
    pub no_decay_params: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
    /// ‖Δp‖ / ‖p‖ of this step for every parameter tensor, by name: a network-health figure
    /// (around 1e-3 is typical; much larger means the learning rate is too high for that tensor).
    pub update_ratios: Vec<(String, f64)>,
    /// float16 only: the gradients overflowed at this loss scale, so no update was made.
    pub skipped: bool,
}

/// torch.cuda.amp.GradScaler's dynamic loss scale, with its defaults, for float16 training: the loss
/// is multiplied by the scale so that small gradients survive in f16; a step whose gradients
/// overflow is skipped and halves the scale, and every 2000 good steps in a row double it.
#[derive(Clone, Debug, PartialEq)]
pub struct GradScaler {
    scale: f64,
    good_steps: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self { scale: 65536.0, good_steps: 0 }
    }
}

impl GradScaler {
    const GROWTH_FACTOR: f64 = 2.0;
    const BACKOFF_FACTOR: f64 = 0.5;
    const GROWTH_INTERVAL: u32 = 2000;

    pub fn scale(&self) -> f64 {
        self.scale
    }

    fn update(&mut self, finite: bool) {
        if !finite {
            self.scale *= Self::BACKOFF_FACTOR;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= Self::GROWTH_FACTOR;
                self.good_steps = 0;
            }
        }
    }
}

struct Slot {
    name: String,
    param: Var,
    decays: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// PyTorch's AdamW (decoupled weight decay, bias correction, eps 1e-8) with state in f32.
/// Tensors of rank >= 2 (matmul weights and embeddings) decay; biases and LayerNorm weights do not.
pub struct AdamW {
    args: OptimizerArgs,
    slots: Vec<Slot>,
    step: u64,
}

pub(crate) const EPS: f64 = 1e-8;

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, args: OptimizerArgs) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let zeros = Tensor::zeros(param.shape(), DType::F32, param.device())?;
                Ok(Slot { name, decays: param.rank() >= 2, exp_avg: zeros.clone(), exp_avg_sq: zeros, param })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { args, slots, step: 0 })
    }

    pub fn groups(&self) -> ParamGroups {
        let mut g = ParamGroups::default();
        for s in &self.slots {
            if s.decays {
                g.decay_tensors += 1;
                g.decay_params += s.param.elem_count();
            } else {
                g.no_decay_tensors += 1;
                g.no_decay_params += s.param.elem_count();
            }
        }
        g
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update at learning rate `lr` from `grads` (one per parameter, in construction order),
    /// clipping their global norm first when configured.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<StepStats> {
        self.check(grads)?;
        let grad_norm = global_norm(grads)?;
        self.apply(grads, lr, grad_norm, 1.0)
    }

    /// As [`AdamW::step`] for gradients of a loss multiplied by `scaler`'s scale: they are unscaled
    /// (before clipping, as GradScaler.unscale_), and a step whose gradients are not finite is skipped.
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, scaler: &mut GradScaler) -> Result<StepStats> {
        self.check(grads)?;
        let inv_scale = 1.0 / scaler.scale();
        let grad_norm = global_norm(grads)? * inv_scale;
        scaler.update(grad_norm.is_finite());
        if !grad_norm.is_finite() {
            return Ok(StepStats { grad_norm, clipped: false, update_ratios: Vec::new(), skipped: true });
        }
        self.apply(grads, lr, grad_norm, inv_scale)
    }

    fn check(&self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.slots.len() {
            candle_core::bail!("expected {} gradients, got {}", self.slots.len(), grads.len());
        }
        Ok(())
    }

    /// The update from `grads` times `inv_scale`, whose global norm is `grad_norm`.
    fn apply(&mut self, grads: &[Tensor], lr: f64, grad_norm: f64, inv_scale: f64) -> Result<StepStats> {
        let clip = self.args.grad_clip;
        let clipped = clip > 0.0 && grad_norm > clip;
        // As torch.nn.utils.clip_grad_norm_: scale by clip/(norm + 1e-6) whenever that is below one.
        let grad_scale = inv_scale * if clip > 0.0 { (clip / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        self.step += 1;
        let (b1, b2) = (self.args.beta1, self.args.beta2);
        let bias_correction1 = 1.0 - b1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        let weight_decay = self.args.weight_decay;
        let mut update_ratios = Vec::with_capacity(self.slots.len());
        // On a GPU the squared norms stay on the device until the end: one transfer instead of two per tensor.
        let mut device_norms = Vec::new();
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let decay = if slot.decays { weight_decay } else { 0.0 };
            if slot.param.device().is_cpu() {
                let update =
                    AdamWUpdate { lr, beta1: b1, beta2: b2, eps: EPS, weight_decay: decay, grad_scale, step_size, bias_correction2_sqrt };
                let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
                let (mut p, mut m, mut v) = (values(slot.param.as_tensor())?, values(&slot.exp_avg)?, values(&slot.exp_avg_sq)?);
                let (change, size) = update.apply(&mut p, &values(grad)?, &mut m, &mut v);
                let shape = slot.param.shape().clone();
                let device = slot.param.device().clone();
                slot.param.set(&Tensor::from_vec(p, shape.clone(), &device)?)?;
                slot.exp_avg = Tensor::from_vec(m, shape.clone(), &device)?;
                slot.exp_avg_sq = Tensor::from_vec(v, shape, &device)?;
                update_ratios.push((slot.name.clone(), ratio(change, size)));
                continue;
            }
            let g = grad.affine(grad_scale, 0.0)?;
            slot.exp_avg = ((&slot.exp_avg * b1)? + (&g * (1.0 - b1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + EPS)?;
            let p = slot.param.as_tensor();
            let decayed = (p * (1.0 - lr * decay))?;
            let updated = (decayed - (slot.exp_avg.div(&denom)? * step_size)?)?;
            device_norms.push((&updated - p)?.sqr()?.sum_all()?);
            device_norms.push(p.sqr()?.sum_all()?);
            update_ratios.push((slot.name.clone(), 0.0));
            slot.param.set(&updated)?;
        }
        if !device_norms.is_empty() {
            let norms = Tensor::stack(&device_norms, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            for ((_, r), pair) in update_ratios.iter_mut().zip(norms.chunks_exact(2)) {
                *r = ratio(pair[0], pair[1]);
            }
        }
        Ok(StepStats { grad_norm, clipped, update_ratios, skipped: false })
    }

    /// The moments and step count, named `<param>.exp_avg` / `<param>.exp_avg_sq` plus `step`.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            out.push((format!("{}.exp_avg", s.name), s.exp_avg.clone()));
            out.push((format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.clone()));
        }
        out.push(("step".to_string(), Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?));
        Ok(out)
    }

    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let step = tensors.get("step").ok_or_else(|| candle_core::Error::Msg("optimizer state has no `step`".into()))?;
        let step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for s in &mut self.slots {
            for (suffix, target) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
                let key = format!("{}.{suffix}", s.name);
                let Some(t) = tensors.get(&key) else {
                    candle_core::bail!("optimizer state has no `{key}`: it was saved for another model")
                };
                if t.dims() != s.param.dims() {
                    candle_core::bail!("optimizer state `{key}` has shape {:?}, expected {:?}", t.dims(), s.param.dims());
                }
                *target = t.to_dtype(DType::F32)?.to_device(s.param.device())?;
            }
        }
        self.step = step.first().copied().unwrap_or(0.0) as u64;
        Ok(())
    }
}

/// L2 norm of all gradients taken together, as torch.nn.utils.clip_grad_norm_ computes it.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    // One transfer for all the per-tensor sums: on a GPU each transfer waits for the device.
    let sums = grads.iter().map(|g| g.sqr()?.sum_all()).collect::<Result<Vec<_>>>()?;
    let sums = Tensor::stack(&sums, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(sums.iter().sum::<f64>().sqrt())
}

/// The same AdamW over flat buffers (the CPU training step's): both moments are one allocation
/// each, laid out as the parameters, and a step is one pass over them, in parallel blocks. Under
/// ZeRO stage 1 each rank of a data-parallel run keeps the moments of its own shard of the flat
/// buffer (see [`crate::collective::shard`]) and updates only those parameters.
pub struct FlatAdamW {
    args: OptimizerArgs,
    /// The elements of the flat buffer this optimizer updates and holds the moments of.
    shard: Range<usize>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    step: u64,
}

/// Elements per block of the parallel update: large enough to amortise a task, small enough that
/// one big tensor (the token embedding) spreads over every thread.
const BLOCK: usize = 1 << 15;

impl FlatAdamW {
    pub fn new(layout: &ParamLayout, args: OptimizerArgs) -> Self {
        Self::for_shard(args, 0..layout.len)
    }

    /// AdamW over the elements `shard` of the flat buffer only.
    pub fn for_shard(args: OptimizerArgs, shard: Range<usize>) -> Self {
        Self { args, exp_avg: vec![0f32; shard.len()], exp_avg_sq: vec![0f32; shard.len()], shard, step: 0 }
    }

    /// AdamW of `args` resumed from its two moments (laid out as the parameters) after `step` steps.
    pub fn from_moments(args: OptimizerArgs, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>, step: u64) -> Self {
        Self { args, shard: 0..exp_avg.len(), exp_avg, exp_avg_sq, step }
    }

    /// The two moments (of the shard) and the step count.
    pub fn moments(&self) -> (&[f32], &[f32], u64) {
        (&self.exp_avg, &self.exp_avg_sq, self.step)
    }

    /// The elements of the flat buffer this optimizer updates.
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }

    pub fn args(&self) -> &OptimizerArgs {
        &self.args
    }

    pub fn groups(layout: &ParamLayout) -> ParamGroups {
        let mut g = ParamGroups::default();
        for t in &layout.tensors {
            let n = t.range.len();
            if t.decays() {
                (g.decay_tensors, g.decay_params) = (g.decay_tensors + 1, g.decay_params + n);
            } else {
                (g.no_decay_tensors, g.no_decay_params) = (g.no_decay_tensors + 1, g.no_decay_params + n);
            }
        }
        g
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of `params` at learning rate `lr` from `grads` (both laid out as `layout` says),
    /// clipping their global norm first when configured; for an optimizer of the whole buffer.
    pub fn step(&mut self, layout: &ParamLayout, params: &mut [f32], grads: &[f32], lr: f64) -> StepStats {
        assert_eq!(self.shard, 0..layout.len, "an optimizer of one shard steps with step_shard");
        self.step_shard(layout, params, grads, lr, &mut |_| {})
    }

    /// [`FlatAdamW::step`] of the shard's `params` only. `sum_over_ranks` adds partial sums up over
    /// the ranks that share the update (ZeRO-1: the squared gradient norm, and each tensor's squared
    /// update and weight norms); an optimizer of the whole buffer never calls it.
    pub fn step_shard(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        sum_over_ranks: &mut dyn FnMut(&mut [f64]),
    ) -> StepStats {
        let shard = self.shard.clone();
        let whole = shard == (0..layout.len);
        let mut norm_squared = [grads[shard.clone()].par_chunks(BLOCK).map(|g| crate::kernels::dot(g, g) as f64).sum::<f64>()];
        if !whole {
            sum_over_ranks(&mut norm_squared);
        }
        let grad_norm = norm_squared[0].sqrt();
        let clip = self.args.grad_clip;
        let clipped = clip > 0.0 && grad_norm > clip;
        // As torch.nn.utils.clip_grad_norm_: scale by clip/(norm + 1e-6) whenever that is below one.
        let grad_scale = if clip > 0.0 { (clip / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        self.step += 1;
        let (b1, b2) = (self.args.beta1, self.args.beta2);
        let update = AdamWUpdate {
            lr,
            beta1: b1,
            beta2: b2,
            eps: EPS,
            weight_decay: 0.0,
            grad_scale,
            step_size: lr / (1.0 - b1.powi(self.step as i32)),
            bias_correction2_sqrt: (1.0 - b2.powi(self.step as i32)).sqrt(),
        };
        // Blocks of at most BLOCK elements of the shard, none spanning two tensors, each knowing its tensor.
        let mut blocks = Vec::new();
        let (mut p_rest, mut m_rest, mut v_rest) = (&mut params[shard.clone()], &mut self.exp_avg[..], &mut self.exp_avg_sq[..]);
        for (index, tensor) in layout.tensors.iter().enumerate() {
            let (mut start, end) = (tensor.range.start.max(shard.start), tensor.range.end.min(shard.end));
            while start < end {
                let len = BLOCK.min(end - start);
                let (p, rest) = std::mem::take(&mut p_rest).split_at_mut(len);
                p_rest = rest;
                let (m, rest) = std::mem::take(&mut m_rest).split_at_mut(len);
                m_rest = rest;
                let (v, rest) = std::mem::take(&mut v_rest).split_at_mut(len);
                v_rest = rest;
                blocks.push((index, p, &grads[start..start + len], m, v));
                start += len;
            }
        }
        let weight_decay = self.args.weight_decay;
        let sums: Vec<(usize, f64, f64)> = blocks
            .into_par_iter()
            .map(|(index, p, g, m, v)| {
                let decay = if layout.tensors[index].decays() { weight_decay } else { 0.0 };
                let (change, size) = AdamWUpdate { weight_decay: decay, ..update }.apply(p, g, m, v);
                (index, change, size)
            })
            .collect();
        // Each tensor's squared update norm and squared weight norm, side by side.
        let mut norms = vec![0f64; 2 * layout.tensors.len()];
        for (index, change, size) in sums {
            norms[2 * index] += change;
            norms[2 * index + 1] += size;
        }
        if !whole {
            sum_over_ranks(&mut norms);
        }
        let update_ratios = layout.tensors.iter().zip(norms.chunks_exact(2)).map(|(t, n)| (t.name.clone(), ratio(n[0], n[1]))).collect();
        StepStats { grad_norm, clipped, update_ratios, skipped: false }
    }

    /// The moments and step count, named `<param>.exp_avg` / `<param>.exp_avg_sq` plus `step`; only
    /// an optimizer of the whole buffer has them all.
    pub fn state(&self, layout: &ParamLayout) -> Result<Vec<(String, Tensor)>> {
        if self.shard != (0..layout.len) {
            candle_core::bail!("the AdamW state is sharded over the ranks (zero_stage=1): gather it on rank 0 before saving it");
        }
        let device = candle_core::Device::Cpu;
        let mut out = Vec::with_capacity(2 * layout.tensors.len() + 1);
        for t in &layout.tensors {
            out.push((format!("{}.exp_avg", t.name), Tensor::from_slice(&self.exp_avg[t.range.clone()], t.shape.as_slice(), &device)?));
            out.push((
                format!("{}.exp_avg_sq", t.name),
                Tensor::from_slice(&self.exp_avg_sq[t.range.clone()], t.shape.as_slice(), &device)?,
            ));
        }
        out.push(("step".to_string(), Tensor::new(&[self.step as f64], &device)?));
        Ok(out)
    }

    /// The moments of the shard and the step count from a whole state as [`FlatAdamW::state`] names it.
    pub fn load_state(&mut self, layout: &ParamLayout, tensors: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let step = tensors.get("step").ok_or_else(|| candle_core::Error::Msg("optimizer state has no `step`".into()))?;
        let step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let shard = self.shard.clone();
        for t in &layout.tensors {
            let overlap = t.range.start.max(shard.start)..t.range.end.min(shard.end);
            for (suffix, target) in [("exp_avg", &mut self.exp_avg), ("exp_avg_sq", &mut self.exp_avg_sq)] {
                let key = format!("{}.{suffix}", t.name);
                let Some(value) = tensors.get(&key) else {
                    candle_core::bail!("optimizer state has no `{key}`: it was saved for another model")
                };
                if value.dims() != t.shape.as_slice() {
                    candle_core::bail!("optimizer state `{key}` has shape {:?}, expected {:?}", value.dims(), t.shape);
                }
                if overlap.is_empty() {
                    continue;
                }
                let values = value.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let within_tensor = overlap.start - t.range.start..overlap.end - t.range.start;
                target[overlap.start - shard.start..overlap.end - shard.start].copy_from_slice(&values[within_tensor]);
            }
        }
        self.step = step.first().copied().unwrap_or(0.0) as u64;
        Ok(())
    }
}
