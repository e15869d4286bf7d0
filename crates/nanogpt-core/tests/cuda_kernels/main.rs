//! The CUDA kernels (`kernels/cuda`) against the CPU kernels they mirror, at small shapes, in f32
//! (tight tolerances) and bf16 (loose ones). They run on the CPU through the crate `cuda-on-cpu`,
//! which executes the same kernel sources with CUDA's thread model, so they need no GPU; a `cuda`
//! build runs them on a CUDA device with `NANOGPT_TEST_DEVICE=cuda` (see gpu.rs).

mod adamw;
mod attention;
mod bias;
mod classifier;
mod decode;
mod encoder;
mod engine;
mod gelu;
mod gpu;
mod layernorm;
mod matmul;
mod train_step;
