//! nanogpt-rs's engine: a GPT-2 style model with its training step, evaluation and sampling,
//! on candle. The napi and wasm bindings expose [`Engine`] and [`LrSchedule::lr_at`] unchanged.

pub mod collective;
#[cfg(feature = "nccl")]
mod collective_nccl;
pub mod cpu_ops;
pub mod cuda;
#[cfg(feature = "cuda")]
mod cudnn;
pub mod decode;
pub mod decode_cuda;
pub mod engine;
pub mod files;
pub mod hf;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod ops;
pub mod optim;
pub mod pickle;
pub mod rendezvous;
pub mod sample;
pub mod torch_checkpoint;
pub mod train_step;
pub mod train_step_cuda;

pub use cuda::MemoryStats;
pub use engine::{Engine, PhaseTimes};
pub use memory::MemoryEstimate;
pub use model::{Gelu, Gpt, ModelArgs};
pub use optim::{GradScaler, LrSchedule, OptimizerArgs, ParamGroups, StepStats};
