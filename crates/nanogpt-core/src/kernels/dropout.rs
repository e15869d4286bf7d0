//! Dropout masks from a counter-based generator: whether element `i` of a dropout site is kept is a
//! hash of (seed, micro-step, site, i), so a mask costs nothing to store, is recomputed in the
//! backward pass, and is the same whichever kernel (fused, composite, explicit step) asks for it.

/// splitmix64's finaliser: a bijective mix whose output bits all depend on every input bit.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Which dropout draw a training forward pass makes: the run's seed and the micro-step's number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    pub step: u64,
}

/// The places dropout applies, each with its own stream of decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The token + position embedding sum.
    Embedding,
    /// The attention weights of layer `l`, element ((b·n_head + h)·T + i)·T + j.
    Attention(usize),
    /// The attention block's output projection of layer `l`, before the residual add.
    AttentionResidual(usize),
    /// The MLP's output projection of layer `l`, before the residual add.
    MlpResidual(usize),
}

impl Site {
    fn id(self) -> u64 {
        match self {
            Site::Embedding => 0,
            Site::Attention(l) => 1 + 3 * l as u64,
            Site::AttentionResidual(l) => 2 + 3 * l as u64,
            Site::MlpResidual(l) => 3 + 3 * l as u64,
        }
    }
}

/// The keep/drop decisions of one site at one micro-step, with probability `p` of dropping.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    pub(crate) stream: u64,
    /// The index, in the site's whole tensor, of element 0 of the buffers this mask is applied to.
    pub(crate) base: usize,
    pub(crate) threshold: u32,
    pub(crate) keep_scale: f32,
}

impl Mask {
    pub fn new(key: DropoutKey, site: Site, p: f32) -> Self {
        let stream = mix(mix(key.seed ^ key.step.wrapping_mul(GOLDEN)) ^ site.id().wrapping_mul(GOLDEN));
        // Elements draw a uniform 24-bit integer u and are dropped when u / 2^24 < p.
        let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
        Self { stream, base: 0, threshold, keep_scale: 1.0 / (1.0 - p) }
    }

    /// The same decisions, for buffers that hold the site's tensor from element `base` on (one shard's rows).
    pub fn starting_at(self, base: usize) -> Self {
        Self { base: self.base + base, ..self }
    }

    /// 1/(1-p) where element `i` is kept, 0 where it is dropped.
    #[inline(always)]
    pub fn scale(&self, i: usize) -> f32 {
        let i = self.base + i;
        let u = (mix(self.stream ^ (i as u64).wrapping_mul(GOLDEN)) >> 40) as u32;
        if u < self.threshold {
            0.0
        } else {
            self.keep_scale
        }
    }

    /// `x[k] *= scale(offset + k)`: applies the mask (forward) or its gradient (backward) in place.
    pub fn apply(&self, x: &mut [f32], offset: usize) {
        x.iter_mut().enumerate().for_each(|(k, v)| *v *= self.scale(offset + k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_about_p_and_differs_by_site_and_step() {
        let key = DropoutKey { seed: 1, step: 0 };
        let a = Mask::new(key, Site::Embedding, 0.25);
        let dropped = (0..100_000).filter(|&i| a.scale(i) == 0.0).count();
        assert!((dropped as f64 / 1e5 - 0.25).abs() < 0.01, "{dropped}");
        let b = Mask::new(key, Site::MlpResidual(0), 0.25);
        let c = Mask::new(DropoutKey { seed: 1, step: 1 }, Site::Embedding, 0.25);
        let same = |m: &Mask| (0..1000).filter(|&i| (m.scale(i) == 0.0) == (a.scale(i) == 0.0)).count();
        assert!(same(&b) < 800 && same(&c) < 800);
        assert_eq!(a.scale(17), Mask::new(key, Site::Embedding, 0.25).scale(17));
    }
}
