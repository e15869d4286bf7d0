//! Node.js bindings of the engine: type translation only (objects of the structs that
//! ts/engine-types.ts declares, typed arrays for tokens, and file paths: the engine maps the files
//! it reads and writes the ones it saves through [`files`]). All logic lives in nanogpt-core.

use std::time::Duration;

use nanogpt_core::rendezvous::Rendezvous;
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::torch_checkpoint::CheckpointInfo;
use nanogpt_core::{collective, files};
use nanogpt_core::{memory, Engine, LrSchedule, ModelArgs, OptimizerArgs};
use napi::bindgen_prelude::{Function, Int32Array, JsObjectValue, Uint32Array, Uint8Array, Unknown};
use napi::{Env, Error, Result, JSON};
use napi_derive::napi;
use serde_json::Value;

fn js_error(e: impl std::fmt::Display) -> Error {
    Error::from_reason(e.to_string())
}

fn from_js<T: serde::de::DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_json::from_value(value).map_err(|e| js_error(format!("invalid {what}: {e}")))
}

/// The JavaScript object of `value`, as `JSON.parse` makes it from serde's JSON: struct fields in
/// their order, every number an f64. (napi's own serializer would make a BigInt of an integer above
/// u32::MAX, such as a byte count of a few GiB; a `serde_json::Value` would sort the fields.)
fn to_js<'env>(env: &'env Env, value: &impl serde::Serialize) -> Result<Unknown<'env>> {
    let text = serde_json::to_string(value).map_err(js_error)?;
    let json: JSON = env.get_global()?.get_named_property_unchecked("JSON")?;
    let parse: Function<String, Unknown> = json.get_named_property_unchecked("parse")?;
    parse.call(text)
}

#[napi]
pub struct Gpt {
    engine: Engine,
}

impl Gpt {
    fn new(engine: Engine) -> Gpt {
        Gpt { engine }
    }
}

#[napi]
impl Gpt {
    #[napi(factory)]
    pub fn create(model_args: Value, seed: i64, device: String) -> Result<Gpt> {
        let args: ModelArgs = from_js(model_args, "model_args")?;
        Ok(Gpt::new(Engine::new(&args, seed as u64, &device).map_err(js_error)?))
    }

    #[napi(factory)]
    pub fn from_safetensors_file(model_args: Value, path: String, device: String) -> Result<Gpt> {
        let args: ModelArgs = from_js(model_args, "model_args")?;
        let bytes = files::map(&path).map_err(js_error)?;
        Ok(Gpt::new(Engine::from_safetensors(&args, &bytes, &device).map_err(js_error)?))
    }

    #[napi(factory)]
    pub fn from_hf_gpt2_file(config_json: String, path: String, dropout: f64, device: String) -> Result<Gpt> {
        let bytes = files::map(&path).map_err(js_error)?;
        Ok(Gpt::new(Engine::from_hf_gpt2(&config_json, &bytes, dropout, &device).map_err(js_error)?))
    }

    #[napi]
    pub fn model_args<'env>(&self, env: &'env Env) -> Result<Unknown<'env>> {
        to_js(env, self.engine.model_args())
    }

    #[napi]
    pub fn crop_block_size(&mut self, block_size: u32) -> Result<()> {
        self.engine.crop_block_size(block_size as usize).map_err(js_error)
    }

    #[napi]
    pub fn num_params(&self, non_embedding: bool) -> f64 {
        self.engine.num_params(non_embedding) as f64
    }

    #[napi]
    pub fn configure_optimizer<'env>(&mut self, env: &'env Env, optimizer_args: Value) -> Result<Unknown<'env>> {
        let args: OptimizerArgs = from_js(optimizer_args, "optimizer arguments")?;
        to_js(env, &self.engine.configure_optimizer(&args).map_err(js_error)?)
    }

    #[napi]
    pub fn load_optimizer_file(&mut self, path: String) -> Result<()> {
        self.engine.load_optimizer(&files::map(&path).map_err(js_error)?).map_err(js_error)
    }

    #[napi]
    pub fn forward_backward(&mut self, x: Uint32Array, y: Int32Array, batch_size: u32, loss_scale: f64) -> Result<f64> {
        let loss = self.engine.forward_backward(&x, &y, batch_size as usize, loss_scale).map_err(js_error)?;
        Ok(loss as f64)
    }

    #[napi]
    pub fn accumulate(&mut self, x: Uint32Array, y: Int32Array, batch_size: u32, loss_scale: f64) -> Result<()> {
        self.engine.accumulate(&x, &y, batch_size as usize, loss_scale).map_err(js_error)
    }

    #[napi]
    pub fn last_loss(&self) -> Result<f64> {
        Ok(self.engine.last_loss().map_err(js_error)? as f64)
    }

    #[napi]
    pub fn step<'env>(&mut self, env: &'env Env, lr: f64) -> Result<Unknown<'env>> {
        to_js(env, &self.engine.step(lr).map_err(js_error)?)
    }

    #[napi]
    pub fn set_precision(&mut self, dtype: String) -> Result<()> {
        self.engine.set_precision(&dtype).map_err(js_error)
    }

    #[napi]
    pub fn synchronize(&self) -> Result<()> {
        self.engine.synchronize().map_err(js_error)
    }

    /// The device memory figures, `null` on the CPU.
    #[napi]
    pub fn memory_stats<'env>(&self, env: &'env Env) -> Result<Unknown<'env>> {
        to_js(env, &self.engine.memory_stats().map_err(js_error)?)
    }

    #[napi]
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        self.engine.set_profiling(on).map_err(js_error)
    }

    /// The last step's phase times, `null` when not profiling.
    #[napi]
    pub fn phase_times<'env>(&self, env: &'env Env) -> Result<Unknown<'env>> {
        to_js(env, &self.engine.phase_times())
    }

    #[napi]
    pub fn eval_loss(&self, x: Uint32Array, y: Int32Array, batch_size: u32) -> Result<f64> {
        Ok(self.engine.eval_loss(&x, &y, batch_size as usize).map_err(js_error)? as f64)
    }

    #[napi]
    pub fn generate(&self, prompt: Uint32Array, max_new_tokens: u32, temperature: f64, top_k: u32, seed: i64) -> Result<Uint32Array> {
        let args = SampleArgs {
            max_new_tokens: max_new_tokens as usize,
            temperature,
            top_k: (top_k > 0).then_some(top_k as usize),
            seed: seed as u64,
        };
        Ok(Uint32Array::new(self.engine.generate(&prompt, &args).map_err(js_error)?))
    }

    /// One sequence per seed, decoded together; the sequences (all of one length) end to end.
    #[napi]
    pub fn generate_batch(
        &self,
        prompt: Uint32Array,
        seeds: Uint32Array,
        max_new_tokens: u32,
        temperature: f64,
        top_k: u32,
    ) -> Result<Uint32Array> {
        let args =
            SampleArgs { max_new_tokens: max_new_tokens as usize, temperature, top_k: (top_k > 0).then_some(top_k as usize), seed: 0 };
        let seeds: Vec<u64> = seeds.iter().map(|&s| s as u64).collect();
        Ok(Uint32Array::new(self.engine.generate_batch(&prompt, &seeds, &args).map_err(js_error)?.concat()))
    }

    /// Starts sequences (one per seed) drawn token by token with `next_tokens`: the tokens `generate_batch` gives.
    #[napi]
    pub fn start_sampling(&mut self, prompt: Uint32Array, seeds: Uint32Array, temperature: f64, top_k: u32) -> Result<()> {
        let seeds: Vec<u64> = seeds.iter().map(|&s| s as u64).collect();
        self.engine.start_sampling(&prompt, &seeds, temperature, (top_k > 0).then_some(top_k as usize)).map_err(js_error)
    }

    /// The next token of every sequence.
    #[napi]
    pub fn next_tokens(&mut self) -> Result<Uint32Array> {
        Ok(Uint32Array::new(self.engine.next_tokens().map_err(js_error)?))
    }

    #[napi]
    pub fn save_weights_file(&self, path: String) -> Result<()> {
        files::write(&path, |out| self.engine.save_weights(out)).map_err(js_error)
    }

    #[napi]
    pub fn export_hf_file(&self, path: String) -> Result<()> {
        files::write(&path, |out| self.engine.export_hf(out)).map_err(js_error)
    }

    #[napi]
    pub fn hf_config(&self) -> String {
        self.engine.hf_config()
    }

    #[napi]
    pub fn save_gradients_file(&self, path: String) -> Result<()> {
        files::write(&path, |out| self.engine.save_gradients(out)).map_err(js_error)
    }

    #[napi]
    pub fn save_optimizer_file(&self, path: String) -> Result<()> {
        files::write(&path, |out| self.engine.save_optimizer(out)).map_err(js_error)
    }

    /// Joins the data-parallel run of the processes mpirun started (a build with the `mpi` feature):
    /// the weights become rank 0's, and each step averages the gradients over the ranks. A collective
    /// call that waits more than `timeout_s` seconds for the other ranks ends the process. Returns
    /// `[rank, world_size]`.
    #[napi]
    pub fn join_mpi(&mut self, timeout_s: f64) -> Result<Vec<u32>> {
        let timeout = positive_seconds(timeout_s, "the collective timeout")?;
        self.engine.join(collective::open_mpi().map_err(js_error)?, timeout).map_err(js_error)?;
        let (rank, world_size) = self.engine.rank();
        Ok(vec![rank as u32, world_size as u32])
    }

    /// Joins the data-parallel run of the processes torchrun started, each on its own GPU (a build with the
    /// `nccl` feature): the ranks meet at `master_addr:master_port` within `rendezvous_timeout_s` seconds, the
    /// weights become rank 0's, and each step averages the gradients over NCCL; a collective call that waits
    /// longer than `timeout_s` ends the process. Returns `[rank, world_size]`.
    #[napi]
    pub fn join_nccl(
        &mut self,
        master_addr: String,
        master_port: u32,
        rank: u32,
        world_size: u32,
        rendezvous_timeout_s: f64,
        timeout_s: f64,
    ) -> Result<Vec<u32>> {
        let master_port =
            u16::try_from(master_port).map_err(|_| js_error(format!("MASTER_PORT={master_port} is not a port; use 1-65535")))?;
        let rendezvous = Rendezvous {
            master_addr,
            master_port,
            rank: rank as usize,
            world_size: world_size as usize,
            timeout: positive_seconds(rendezvous_timeout_s, "the rendezvous timeout")?,
        };
        let collective = collective::open_nccl(self.engine.device(), &rendezvous).map_err(js_error)?;
        self.engine.join(collective, positive_seconds(timeout_s, "the collective timeout")?).map_err(js_error)?;
        let (rank, world_size) = self.engine.rank();
        Ok(vec![rank as u32, world_size as u32])
    }

    /// Returns once every rank has called it.
    #[napi]
    pub fn barrier(&self) {
        self.engine.barrier();
    }

    /// Whether `flag` is set on any rank of the data-parallel run: every rank gets the same answer.
    #[napi]
    pub fn any_rank(&mut self, flag: bool) -> bool {
        self.engine.any_rank(flag)
    }

    /// Where the dropout masks continue: those of micro-step `micro_step` of a model created with `seed`.
    #[napi]
    pub fn set_dropout_stream(&mut self, seed: i64, micro_step: i64) {
        self.engine.set_dropout_stream(seed as u64, micro_step as u64);
    }

    /// Whether the next micro-steps' backward passes average the gradients over the ranks as they finish them.
    #[napi]
    pub fn set_backward_grad_sync(&mut self, sync: bool) {
        self.engine.set_backward_grad_sync(sync);
    }

    /// ZeRO stage 1 (1) or none (0), after joining and before configuring the optimizer.
    #[napi]
    pub fn set_zero_stage(&mut self, stage: u32) -> Result<()> {
        self.engine.set_zero_stage(stage).map_err(js_error)
    }

    /// Under ZeRO-1, brings every rank's shard of the AdamW state to rank 0 for its checkpoint; every rank calls it.
    #[napi]
    pub fn gather_optimizer_state(&mut self) -> Result<()> {
        self.engine.gather_optimizer_state().map_err(js_error)
    }

    #[napi(factory)]
    pub fn from_nanogpt_checkpoint_file(model_args: Value, path: String, device: String) -> Result<Gpt> {
        let args: ModelArgs = from_js(model_args, "model_args")?;
        let bytes = files::map(&path).map_err(js_error)?;
        Ok(Gpt::new(Engine::from_nanogpt_checkpoint(&args, &bytes, &device).map_err(js_error)?))
    }

    #[napi]
    pub fn load_nanogpt_optimizer_file(&mut self, path: String) -> Result<()> {
        self.engine.load_nanogpt_optimizer(&files::map(&path).map_err(js_error)?).map_err(js_error)
    }

    #[napi]
    pub fn save_nanogpt_checkpoint_file(&self, path: String, info: Value) -> Result<()> {
        let info: CheckpointInfo = from_js(info, "checkpoint info")?;
        files::write(&path, |out| self.engine.save_nanogpt_checkpoint(out, &info)).map_err(js_error)
    }
}

/// The `model_args`, `iter_num`, `best_val_loss` and `config` of nanoGPT's `ckpt.pt` at `path`.
#[napi]
pub fn nanogpt_checkpoint_info_file(env: &Env, path: String) -> Result<Unknown<'_>> {
    let bytes = files::map(&path).map_err(js_error)?;
    to_js(env, &nanogpt_core::engine::nanogpt_checkpoint_info(&bytes).map_err(js_error)?)
}

/// Ends MPI in this process once every rank has finished (nothing without MPI).
#[napi]
pub fn finalize_mpi() {
    collective::finalize_mpi();
}

/// A pickle of plain data (e.g. nanoGPT's `meta.pkl`) as JSON; pickles that would call code are refused.
#[napi]
pub fn pickle_to_json(bytes: Uint8Array) -> Result<String> {
    nanogpt_core::pickle::to_json_string(&bytes).map_err(js_error)
}

/// Refuses a `device` name other than cpu, cuda or cuda:N, with the names there are (`engine::device_ordinal`).
#[napi]
pub fn check_device(name: String) -> Result<()> {
    nanogpt_core::engine::device_ordinal(&name).map(drop).map_err(js_error)
}

#[napi]
pub fn lr_at(iter: f64, schedule: Value) -> Result<f64> {
    let schedule: LrSchedule = from_js(schedule, "learning-rate schedule")?;
    Ok(schedule.lr_at(iter as u64))
}

/// Memory a run with `batch_size` rows needs, by purpose, in bytes (a `MemoryEstimate`).
#[napi]
pub fn estimate_memory(env: &Env, model_args: Value, batch_size: u32, training: bool) -> Result<Unknown<'_>> {
    let args: ModelArgs = from_js(model_args, "model_args")?;
    let batch_size = batch_size as usize;
    to_js(env, &if training { memory::training(&args, batch_size) } else { memory::sampling(&args, batch_size) })
}

/// Runs one linear layer's matrix products `reps` times on one pool thread (`kernels::matmul::repeat`), for
/// timing them from JavaScript (`npm run bench:gemm`).
#[napi]
pub fn repeat_linear(backward: bool, n: u32, c: u32, oc: u32, reps: u32) -> f64 {
    nanogpt_core::kernels::matmul::repeat(backward, n as usize, c as usize, oc as usize, reps as usize) as f64
}

/// `seconds` as a duration, refused unless positive and finite: `what` names it in the error.
fn positive_seconds(seconds: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| js_error(format!("{what} must be a positive number of seconds, got {seconds}")))
}
