//! PyTorch's AdamW arithmetic (decoupled weight decay, bias correction) on f32 slices, in place,
//! one pass over parameter, gradient and both moments.

/// Elements updated together: two SIMD vectors of f32 on most targets.
const LANES: usize = 8;

/// The step's constants, shared by every element of one parameter group.
#[derive(Clone, Copy, Debug)]
pub struct AdamWUpdate {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Multiplies the gradient first (global-norm clipping, loss-scale removal).
    pub grad_scale: f64,
    /// lr / (1 - beta1^step).
    pub step_size: f64,
    /// sqrt(1 - beta2^step).
    pub bias_correction2_sqrt: f64,
}

impl AdamWUpdate {
    /// Updates `param`, `exp_avg` and `exp_avg_sq` from `grad`; returns the squared norms of the
    /// change ‖Δp‖² and of the parameter before it ‖p‖², for the update/weight ratio.
    pub fn apply(&self, param: &mut [f32], grad: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32]) -> (f64, f64) {
        let n = param.len();
        assert!(grad.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n, "adamw: buffer sizes do not match");
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let (scale, step, bc2, eps) = (self.grad_scale as f32, self.step_size as f32, self.bias_correction2_sqrt as f32, self.eps as f32);
        // One element: the new parameter and moments, and the element's shares of the two squared norms.
        let update = |p: &mut f32, g: f32, m: &mut f32, v: &mut f32| -> (f32, f32) {
            let gi = g * scale;
            *m = b1 * *m + (1.0 - b1) * gi;
            *v = b2 * *v + (1.0 - b2) * gi * gi;
            let p0 = *p;
            *p = p0 * decay - step * *m / (v.sqrt() / bc2 + eps);
            ((*p - p0) * (*p - p0), p0 * p0)
        };
        // Eight elements at a time as fixed-size arrays, with eight partial sums per norm: a length the compiler
        // sees is what lets the loop vectorise, in WebAssembly too (see `kernels::dot`).
        let (mut change, mut size) = ([0f32; LANES], [0f32; LANES]);
        let mut params = param.chunks_exact_mut(LANES);
        let mut grads = grad.chunks_exact(LANES);
        let mut avgs = exp_avg.chunks_exact_mut(LANES);
        let mut avgs_sq = exp_avg_sq.chunks_exact_mut(LANES);
        for (((p, g), m), v) in (&mut params).zip(&mut grads).zip(&mut avgs).zip(&mut avgs_sq) {
            let (p, g): (&mut [f32; LANES], &[f32; LANES]) = (p.try_into().expect("a whole chunk"), g.try_into().expect("a whole chunk"));
            let (m, v): (&mut [f32; LANES], &mut [f32; LANES]) =
                (m.try_into().expect("a whole chunk"), v.try_into().expect("a whole chunk"));
            for k in 0..LANES {
                let (c, s) = update(&mut p[k], g[k], &mut m[k], &mut v[k]);
                change[k] += c;
                size[k] += s;
            }
        }
        let rest =
            params.into_remainder().iter_mut().zip(grads.remainder()).zip(avgs.into_remainder().iter_mut().zip(avgs_sq.into_remainder()));
        for (k, ((p, &g), (m, v))) in rest.enumerate() {
            let (c, s) = update(p, g, m, v);
            change[k] += c;
            size[k] += s;
        }
        (change.iter().sum::<f32>() as f64, size.iter().sum::<f32>() as f64)
    }
}

/// ‖Δp‖ / ‖p‖ from the two squared norms (0 for an all-zero tensor).
pub fn ratio(change_sq: f64, size_sq: f64) -> f64 {
    if size_sq > 0.0 {
        (change_sq / size_sq).sqrt()
    } else {
        0.0
    }
}
