//! WebAssembly bindings of the engine: type translation only (objects of the structs that
//! ts/engine-types.ts declares, typed arrays for tokens, and bytes for the engine's files, since a
//! wasm module has no file system: the engine writes them through [`files::to_vec`]).
//! All logic lives in nanogpt-core, as for the Node.js addon.

use nanogpt_core::files;
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::torch_checkpoint::CheckpointInfo;
use nanogpt_core::{memory, Engine, LrSchedule, ModelArgs, OptimizerArgs};
use wasm_bindgen::prelude::*;

#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
mod threads;

/// The WebAssembly engine computes on the CPU only.
const DEVICE: &str = "cpu";

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn from_js<T: serde::de::DeserializeOwned>(value: JsValue, what: &str) -> Result<T, JsError> {
    serde_wasm_bindgen::from_value(value).map_err(|e| {
        // The message alone: the error is a JavaScript Error, whose text starts with "Error: ".
        let message = String::from(js_sys::Error::from(JsValue::from(e)).message());
        js_error(format!("invalid {what}: {message}"))
    })
}

/// Plain objects, and `null` for None, as the Node.js addon gives them (not Maps and `undefined`).
fn to_js(value: &impl serde::Serialize) -> Result<JsValue, JsError> {
    value.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(js_error)
}

#[wasm_bindgen]
pub struct Gpt {
    engine: Engine,
}

impl Gpt {
    fn new(engine: Engine) -> Gpt {
        Gpt { engine }
    }
}

#[wasm_bindgen]
impl Gpt {
    pub fn create(model_args: JsValue, seed: f64) -> Result<Gpt, JsError> {
        let args: ModelArgs = from_js(model_args, "model_args")?;
        Ok(Gpt::new(Engine::new(&args, seed as u64, DEVICE).map_err(js_error)?))
    }

    #[wasm_bindgen(js_name = fromSafetensors)]
    pub fn from_safetensors(model_args: JsValue, bytes: &[u8]) -> Result<Gpt, JsError> {
        let args: ModelArgs = from_js(model_args, "model_args")?;
        Ok(Gpt::new(Engine::from_safetensors(&args, bytes, DEVICE).map_err(js_error)?))
    }

    #[wasm_bindgen(js_name = fromHfGpt2)]
    pub fn from_hf_gpt2(config_json: &str, bytes: &[u8], dropout: f64) -> Result<Gpt, JsError> {
        Ok(Gpt::new(Engine::from_hf_gpt2(config_json, bytes, dropout, DEVICE).map_err(js_error)?))
    }

    #[wasm_bindgen(js_name = modelArgs)]
    pub fn model_args(&self) -> Result<JsValue, JsError> {
        to_js(self.engine.model_args())
    }

    #[wasm_bindgen(js_name = cropBlockSize)]
    pub fn crop_block_size(&mut self, block_size: u32) -> Result<(), JsError> {
        self.engine.crop_block_size(block_size as usize).map_err(js_error)
    }

    #[wasm_bindgen(js_name = numParams)]
    pub fn num_params(&self, non_embedding: bool) -> f64 {
        self.engine.num_params(non_embedding) as f64
    }

    #[wasm_bindgen(js_name = configureOptimizer)]
    pub fn configure_optimizer(&mut self, optimizer_args: JsValue) -> Result<JsValue, JsError> {
        let args: OptimizerArgs = from_js(optimizer_args, "optimizer arguments")?;
        to_js(&self.engine.configure_optimizer(&args).map_err(js_error)?)
    }

    #[wasm_bindgen(js_name = loadOptimizer)]
    pub fn load_optimizer(&mut self, bytes: &[u8]) -> Result<(), JsError> {
        self.engine.load_optimizer(bytes).map_err(js_error)
    }

    #[wasm_bindgen(js_name = forwardBackward)]
    pub fn forward_backward(&mut self, x: &[u32], y: &[i32], batch_size: u32, loss_scale: f64) -> Result<f64, JsError> {
        let loss = self.engine.forward_backward(x, y, batch_size as usize, loss_scale).map_err(js_error)?;
        Ok(loss as f64)
    }

    pub fn accumulate(&mut self, x: &[u32], y: &[i32], batch_size: u32, loss_scale: f64) -> Result<(), JsError> {
        self.engine.accumulate(x, y, batch_size as usize, loss_scale).map_err(js_error)
    }

    /// Where the dropout masks continue: those of micro-step `micro_step` of a model created with `seed`.
    #[wasm_bindgen(js_name = setDropoutStream)]
    pub fn set_dropout_stream(&mut self, seed: f64, micro_step: f64) {
        self.engine.set_dropout_stream(seed as u64, micro_step as u64);
    }

    #[wasm_bindgen(js_name = lastLoss)]
    pub fn last_loss(&self) -> Result<f64, JsError> {
        Ok(self.engine.last_loss().map_err(js_error)? as f64)
    }

    pub fn step(&mut self, lr: f64) -> Result<JsValue, JsError> {
        to_js(&self.engine.step(lr).map_err(js_error)?)
    }

    /// float32 only: the CPU engine computes in f32 (the call exists so both bindings take the same calls).
    #[wasm_bindgen(js_name = setPrecision)]
    pub fn set_precision(&mut self, dtype: &str) -> Result<(), JsError> {
        self.engine.set_precision(dtype).map_err(js_error)
    }

    pub fn synchronize(&self) -> Result<(), JsError> {
        self.engine.synchronize().map_err(js_error)
    }

    /// The device memory figures: `null`, as on every CPU.
    #[wasm_bindgen(js_name = memoryStats)]
    pub fn memory_stats(&self) -> Result<JsValue, JsError> {
        to_js(&self.engine.memory_stats().map_err(js_error)?)
    }

    #[wasm_bindgen(js_name = setProfiling)]
    pub fn set_profiling(&mut self, on: bool) -> Result<(), JsError> {
        self.engine.set_profiling(on).map_err(js_error)
    }

    /// The last step's phase times, `null` when not profiling.
    #[wasm_bindgen(js_name = phaseTimes)]
    pub fn phase_times(&self) -> Result<JsValue, JsError> {
        to_js(&self.engine.phase_times())
    }

    #[wasm_bindgen(js_name = evalLoss)]
    pub fn eval_loss(&self, x: &[u32], y: &[i32], batch_size: u32) -> Result<f64, JsError> {
        Ok(self.engine.eval_loss(x, y, batch_size as usize).map_err(js_error)? as f64)
    }

    pub fn generate(&self, prompt: &[u32], max_new_tokens: u32, temperature: f64, top_k: u32, seed: f64) -> Result<Vec<u32>, JsError> {
        let args = SampleArgs {
            max_new_tokens: max_new_tokens as usize,
            temperature,
            top_k: (top_k > 0).then_some(top_k as usize),
            seed: seed as u64,
        };
        self.engine.generate(prompt, &args).map_err(js_error)
    }

    /// One sequence per seed, decoded together; the sequences (all of one length) end to end.
    #[wasm_bindgen(js_name = generateBatch)]
    pub fn generate_batch(
        &self,
        prompt: &[u32],
        seeds: &[u32],
        max_new_tokens: u32,
        temperature: f64,
        top_k: u32,
    ) -> Result<Vec<u32>, JsError> {
        let args =
            SampleArgs { max_new_tokens: max_new_tokens as usize, temperature, top_k: (top_k > 0).then_some(top_k as usize), seed: 0 };
        let seeds: Vec<u64> = seeds.iter().map(|&s| s as u64).collect();
        Ok(self.engine.generate_batch(prompt, &seeds, &args).map_err(js_error)?.concat())
    }

    /// Starts sequences (one per seed) drawn token by token with `nextTokens`: the tokens `generateBatch` gives.
    #[wasm_bindgen(js_name = startSampling)]
    pub fn start_sampling(&mut self, prompt: &[u32], seeds: &[u32], temperature: f64, top_k: u32) -> Result<(), JsError> {
        let seeds: Vec<u64> = seeds.iter().map(|&s| s as u64).collect();
        self.engine.start_sampling(prompt, &seeds, temperature, (top_k > 0).then_some(top_k as usize)).map_err(js_error)
    }

    /// The next token of every sequence.
    #[wasm_bindgen(js_name = nextTokens)]
    pub fn next_tokens(&mut self) -> Result<Vec<u32>, JsError> {
        self.engine.next_tokens().map_err(js_error)
    }

    #[wasm_bindgen(js_name = saveWeights)]
    pub fn save_weights(&self) -> Result<Vec<u8>, JsError> {
        files::to_vec(|out| self.engine.save_weights(out)).map_err(js_error)
    }

    #[wasm_bindgen(js_name = exportHf)]
    pub fn export_hf(&self) -> Result<Vec<u8>, JsError> {
        files::to_vec(|out| self.engine.export_hf(out)).map_err(js_error)
    }

    #[wasm_bindgen(js_name = hfConfig)]
    pub fn hf_config(&self) -> String {
        self.engine.hf_config()
    }

    #[wasm_bindgen(js_name = saveGradients)]
    pub fn save_gradients(&self) -> Result<Vec<u8>, JsError> {
        files::to_vec(|out| self.engine.save_gradients(out)).map_err(js_error)
    }

    #[wasm_bindgen(js_name = saveOptimizer)]
    pub fn save_optimizer(&self) -> Result<Vec<u8>, JsError> {
        files::to_vec(|out| self.engine.save_optimizer(out)).map_err(js_error)
    }

    #[wasm_bindgen(js_name = fromNanogptCheckpoint)]
    pub fn from_nanogpt_checkpoint(model_args: JsValue, bytes: &[u8]) -> Result<Gpt, JsError> {
        let args: ModelArgs = from_js(model_args, "model_args")?;
        Ok(Gpt::new(Engine::from_nanogpt_checkpoint(&args, bytes, DEVICE).map_err(js_error)?))
    }

    #[wasm_bindgen(js_name = loadNanogptOptimizer)]
    pub fn load_nanogpt_optimizer(&mut self, bytes: &[u8]) -> Result<(), JsError> {
        self.engine.load_nanogpt_optimizer(bytes).map_err(js_error)
    }

    #[wasm_bindgen(js_name = saveNanogptCheckpoint)]
    pub fn save_nanogpt_checkpoint(&self, info: JsValue) -> Result<Vec<u8>, JsError> {
        let info: CheckpointInfo = from_js(info, "checkpoint info")?;
        files::to_vec(|out| self.engine.save_nanogpt_checkpoint(out, &info)).map_err(js_error)
    }
}

/// The `model_args`, `iter_num`, `best_val_loss` and `config` of nanoGPT's `ckpt.pt` bytes.
#[wasm_bindgen(js_name = nanogptCheckpointInfo)]
pub fn nanogpt_checkpoint_info(bytes: &[u8]) -> Result<JsValue, JsError> {
    to_js(&nanogpt_core::engine::nanogpt_checkpoint_info(bytes).map_err(js_error)?)
}

/// A pickle of plain data (e.g. nanoGPT's `meta.pkl`) as JSON; pickles that would call code are refused.
#[wasm_bindgen(js_name = pickleToJson)]
pub fn pickle_to_json(bytes: &[u8]) -> Result<String, JsError> {
    nanogpt_core::pickle::to_json_string(bytes).map_err(js_error)
}

/// Refuses a `device` name other than cpu, cuda or cuda:N, with the names there are (`engine::device_ordinal`).
#[wasm_bindgen(js_name = checkDevice)]
pub fn check_device(name: &str) -> Result<(), JsError> {
    nanogpt_core::engine::device_ordinal(name).map(drop).map_err(js_error)
}

#[wasm_bindgen(js_name = lrAt)]
pub fn lr_at(iter: f64, schedule: JsValue) -> Result<f64, JsError> {
    let schedule: LrSchedule = from_js(schedule, "learning-rate schedule")?;
    Ok(schedule.lr_at(iter as u64))
}

/// Memory a run with `batch_size` rows needs, by purpose, in bytes (a `MemoryEstimate`).
#[wasm_bindgen(js_name = estimateMemory)]
pub fn estimate_memory(model_args: JsValue, batch_size: u32, training: bool) -> Result<JsValue, JsError> {
    let args: ModelArgs = from_js(model_args, "model_args")?;
    let batch_size = batch_size as usize;
    to_js(&if training { memory::training(&args, batch_size) } else { memory::sampling(&args, batch_size) })
}

/// Runs one linear layer's matrix products `reps` times on one pool thread (`kernels::matmul::repeat`), for
/// timing them from JavaScript (`npm run bench:gemm`).
#[wasm_bindgen(js_name = repeatLinear)]
pub fn repeat_linear(backward: bool, n: u32, c: u32, oc: u32, reps: u32) -> f32 {
    nanogpt_core::kernels::matmul::repeat(backward, n as usize, c as usize, oc as usize, reps as usize)
}
