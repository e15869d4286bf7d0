//! The CUDA kernels (`kernels/cuda`) against the CPU kernels they mirror, at small shapes, in f32
//! (tight tolerances) and bf16 (loose ones). They run on the CPU through the crate `cuda-on-cpu`,
//! which executes the same kernel sources with CUDA's thread model, so they need no GPU.

mod bias;
mod encoder;
mod gelu;
mod gpu;
mod layernorm;
mod matmul;
