//! nanoGPT's `ckpt.pt`, read and written: what `torch.save` makes of train.py's checkpoint dict
//! (`model`, `optimizer`, `model_args`, `iter_num`, `best_val_loss`, `config`).
//!
//! The file is a zip archive of stored (uncompressed) entries: `<name>/data.pkl`, a pickle of the dict in
//! which each tensor refers by key to the entry `<name>/data/<key>` holding its storage's raw bytes
//! (little-endian, as `<name>/byteorder` says when present). Readers take a byte slice, usually a
//! memory map of the file, and copy out only the tensors they use.
//!
//! The optimizer's state is keyed by torch's parameter index: nanoGPT's `configure_optimizers` puts the
//! parameters with two or more dimensions (in `named_parameters` order, the tied output layer once as
//! `transformer.wte.weight`) in a decay group and the rest in a no-decay group, and torch numbers them
//! 0.. across the decay group then the no-decay group.

use std::collections::HashMap;
use std::io::{Cursor, Seek, Write};

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::model::{Gpt, ModelArgs};
use crate::pickle::{self, TensorRef, Value};

/// What a checkpoint says besides its tensors (the same fields as this project's `ckpt.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct CheckpointInfo {
    pub model_args: ModelArgs,
    pub iter_num: u64,
    pub best_val_loss: f64,
    /// The run's config keys (its `dataset` says where the vocabulary is).
    #[ts(type = "Record<string, unknown>")]
    pub config: Json,
}

/// torch.compile wraps the model, so its state dict names carry this prefix.
const COMPILED_PREFIX: &str = "_orig_mod.";

fn damaged(problem: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("not a readable PyTorch checkpoint: {problem}"))
}

/// An opened `ckpt.pt`: its pickle read, its storages located in `bytes`.
pub struct TorchCheckpoint<'a> {
    bytes: &'a [u8],
    /// Storage key -> byte range of its zip entry.
    storages: HashMap<String, (usize, usize)>,
    pub root: Value,
}

impl<'a> TorchCheckpoint<'a> {
    pub fn read(bytes: &'a [u8]) -> Result<Self> {
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
            .map_err(|e| damaged(format!("{e} (is the file truncated, or not made by torch.save?)")))?;
        let mut pickle_range = None;
        let mut storages = HashMap::new();
        for i in 0..archive.len() {
            let entry = archive.by_index_raw(i).map_err(damaged)?;
            let name = entry.name().map_err(damaged)?.into_owned();
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(damaged(format!("the entry {name} is compressed, which torch.save never does")));
            }
            let start = entry.data_start().ok_or_else(|| damaged(format!("the entry {name} has no data")))? as usize;
            let len = entry.size() as usize;
            if start.checked_add(len).is_none_or(|end| end > bytes.len()) {
                return Err(damaged(format!("the entry {name} runs past the end of the file (truncated?)")));
            }
            let Some((_, inner)) = name.split_once('/') else { continue };
            if inner == "data.pkl" {
                pickle_range = Some((start, len));
            } else if inner == "byteorder" && &bytes[start..start + len] != b"little" {
                return Err(damaged("its tensors are big-endian; load and save it with torch on a little-endian machine first"));
            } else if let Some(key) = inner.strip_prefix("data/") {
                storages.insert(key.to_string(), (start, len));
            }
        }
        let (start, len) = pickle_range.ok_or_else(|| damaged("it has no data.pkl"))?;
        let root = pickle::read(&bytes[start..start + len])?;
        Ok(Self { bytes, storages, root })
    }

    /// The tensor `t` as f32 on the CPU, copied out of its storage.
    pub fn tensor(&self, t: &TensorRef) -> Result<Tensor> {
        let &(start, len) = self.storages.get(&t.storage).ok_or_else(|| damaged(format!("the storage {} is missing", t.storage)))?;
        let numel: usize = t.shape.iter().product();
        let mut expected = 1;
        for (&dim, &stride) in t.shape.iter().zip(&t.stride).rev() {
            if dim > 1 && stride != expected {
                return Err(damaged("a tensor is not contiguous; save it with .contiguous() first"));
            }
            expected *= dim;
        }
        let size = t.dtype.size_in_bytes();
        let begin = t.offset * size;
        let end = begin + numel * size;
        if end > len {
            return Err(damaged(format!("the storage {} is shorter than its tensor (truncated?)", t.storage)));
        }
        Tensor::from_raw_buffer(&self.bytes[start + begin..start + end], t.dtype, &t.shape, &Device::Cpu)?.to_dtype(DType::F32)
    }

    fn field(&self, key: &str) -> Result<&Value> {
        self.root.get(key).ok_or_else(|| damaged(format!("it has no `{key}` (is it a nanoGPT train.py checkpoint?)")))
    }

    /// A number that may have been saved as a 0-d tensor (`best_val_loss` is one).
    fn number(&self, key: &str) -> Result<f64> {
        match self.field(key)? {
            Value::Tensor(t) => Ok(self.tensor(t)?.flatten_all()?.to_vec1::<f32>()?.first().copied().unwrap_or(f32::NAN) as f64),
            v => v.as_float().ok_or_else(|| damaged(format!("`{key}` is not a number"))),
        }
    }

    pub fn info(&self) -> Result<CheckpointInfo> {
        let model_args: ModelArgs = serde_json::from_value(self.field("model_args")?.to_json()?)
            .map_err(|e| damaged(format!("its model_args are not nanoGPT's ({e})")))?;
        model_args.validate()?;
        let config = match self.root.get("config") {
            Some(config) => config.to_json()?,
            None => Json::Object(Default::default()),
        };
        let iter_num = self.field("iter_num")?.as_int().filter(|&i| i >= 0).ok_or_else(|| damaged("`iter_num` is not a count"))? as u64;
        Ok(CheckpointInfo { model_args, iter_num, best_val_loss: self.number("best_val_loss")?, config })
    }

    /// The state dict's tensors by name, without torch.compile's prefix.
    fn state_dict(&self) -> Result<HashMap<String, &TensorRef>> {
        let model = self.field("model")?.as_dict().ok_or_else(|| damaged("`model` is not a state dict"))?;
        let mut out = HashMap::with_capacity(model.len());
        for (k, v) in model {
            let (Some(name), Value::Tensor(t)) = (k.as_str(), v) else { return Err(damaged("`model` is not a state dict of tensors")) };
            out.insert(name.strip_prefix(COMPILED_PREFIX).unwrap_or(name).to_string(), t);
        }
        Ok(out)
    }

    /// The weights the model uses, by nanoGPT name: the causal-mask buffers `attn.bias` of runs without flash
    /// attention are skipped, and `lm_head.weight` must be the token embedding (nanoGPT ties them).
    pub fn weights(&self, model: &Gpt) -> Result<HashMap<String, Tensor>> {
        let state = self.state_dict()?;
        if let (Some(head), Some(wte)) = (state.get("lm_head.weight"), state.get("transformer.wte.weight")) {
            if head.storage != wte.storage || head.offset != wte.offset {
                candle_core::bail!("the checkpoint's lm_head.weight is not tied to transformer.wte.weight, as nanoGPT's model ties them; this engine cannot load it");
            }
        }
        let mut out = HashMap::new();
        for (name, _) in model.named_parameters() {
            let t = state.get(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "the checkpoint has no tensor `{name}`: its weights do not match its model_args (another architecture?)"
                ))
            })?;
            out.insert(name, self.tensor(t)?);
        }
        Ok(out)
    }

    /// The AdamW state in this engine's names (`<param>.exp_avg`, `<param>.exp_avg_sq`, `step`), or None when
    /// the optimizer has not stepped yet.
    pub fn optimizer_state(&self, model: &Gpt) -> Result<Option<HashMap<String, Tensor>>> {
        let optimizer = self.field("optimizer")?;
        let (Some(state), Some(groups)) =
            (optimizer.get("state").and_then(Value::as_dict), optimizer.get("param_groups").and_then(Value::as_seq))
        else {
            return Err(damaged("`optimizer` is not a torch optimizer state dict"));
        };
        let order = torch_parameter_order(model);
        let indices: Vec<i64> =
            groups.iter().flat_map(|g| g.get("params").and_then(Value::as_seq).unwrap_or(&[])).filter_map(Value::as_int).collect();
        let sizes: Vec<usize> = groups.iter().map(|g| g.get("params").and_then(Value::as_seq).map_or(0, <[Value]>::len)).collect();
        let decay = order.iter().filter(|(_, decays)| *decays).count();
        if sizes != [decay, order.len() - decay] {
            candle_core::bail!(
                "the checkpoint's optimizer has parameter groups of {sizes:?} tensors, nanoGPT's for this model has [{decay}, {}]; it was saved for another model or optimizer",
                order.len() - decay
            );
        }
        if state.is_empty() {
            return Ok(None);
        }
        let mut out = HashMap::new();
        let mut step = None;
        for (index, (name, _)) in indices.iter().zip(&order) {
            let entry = state.iter().find(|(k, _)| k.as_int() == Some(*index)).map(|(_, v)| v);
            let entry = entry.ok_or_else(|| damaged(format!("the optimizer has no state for parameter {index} ({name})")))?;
            for moment in ["exp_avg", "exp_avg_sq"] {
                let Some(Value::Tensor(t)) = entry.get(moment) else {
                    return Err(damaged(format!("the optimizer state of {name} has no {moment}")));
                };
                out.insert(format!("{name}.{moment}"), self.tensor(t)?);
            }
            step = Some(match entry.get("step") {
                Some(Value::Tensor(t)) => self.tensor(t)?.flatten_all()?.to_vec1::<f32>()?.first().copied().unwrap_or(0.0) as f64,
                Some(v) => v.as_float().ok_or_else(|| damaged(format!("the optimizer step of {name} is not a number")))?,
                None => return Err(damaged(format!("the optimizer state of {name} has no step"))),
            });
        }
        out.insert("step".to_string(), Tensor::new(&[step.unwrap_or(0.0)], &Device::Cpu)?);
        Ok(Some(out))
    }
}

/// Parameter names in torch's optimizer index order, with whether each is in the decay group.
fn torch_parameter_order(model: &Gpt) -> Vec<(String, bool)> {
    let params: Vec<(String, bool)> = model.named_parameters().into_iter().map(|(n, v)| (n, v.rank() >= 2)).collect();
    let (decay, no_decay): (Vec<_>, Vec<_>) = params.into_iter().partition(|(_, decays)| *decays);
    decay.into_iter().chain(no_decay).collect()
}

/// nanoGPT's `config` defaults for the optimizer's hyperparameters, used where a config lacks them.
fn config_number(config: &Json, key: &str, default: f64) -> f64 {
    config.get(key).and_then(Json::as_f64).unwrap_or(default)
}

/// Writes a `ckpt.pt` that nanoGPT's train.py (`init_from='resume'`) and sample.py load: the weights,
/// the AdamW state (`optimizer`: this engine's state names; an empty state when None), and `info`.
pub fn write<W: Write + Seek>(out: W, model: &Gpt, optimizer: Option<&HashMap<String, Tensor>>, info: &CheckpointInfo) -> Result<()> {
    let mut storages: Vec<Tensor> = Vec::new();
    let mut p = pickle::Writer::new();
    let args = &info.model_args;
    p.empty_dict();
    p.mark();

    p.str("model");
    p.global("collections", "OrderedDict");
    p.mark();
    p.tuple();
    p.reduce();
    p.mark();
    let mut wte_key = None;
    for (name, var) in model.named_parameters() {
        p.str(&name);
        if name == "transformer.wte.weight" {
            wte_key = Some(storages.len());
        }
        tensor(&mut p, var.as_tensor(), &mut storages);
    }
    // Tied: the output layer is the token embedding's storage, as torch.save writes a shared parameter.
    p.str("lm_head.weight");
    tensor_ref(&mut p, model.wte.dims(), wte_key.expect("every model has a token embedding"));
    p.set_items();

    p.str("optimizer");
    p.empty_dict();
    p.mark();
    p.str("state");
    p.empty_dict();
    let order = torch_parameter_order(model);
    if let Some(state) = optimizer {
        let step = state.get("step").map(|s| s.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()).transpose()?;
        let step = step.and_then(|s| s.first().copied()).unwrap_or(0.0);
        p.mark();
        for (index, (name, _)) in order.iter().enumerate() {
            p.int(index as i64);
            p.empty_dict();
            p.mark();
            p.str("step");
            tensor(&mut p, &Tensor::new(step as f32, &Device::Cpu)?, &mut storages);
            for moment in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{name}.{moment}");
                let t = state.get(&key).ok_or_else(|| candle_core::Error::Msg(format!("the optimizer state has no `{key}`")))?;
                p.str(moment);
                tensor(&mut p, t, &mut storages);
            }
            p.set_items();
        }
        p.set_items();
    }
    p.str("param_groups");
    p.empty_list();
    p.mark();
    let decay = order.iter().filter(|(_, decays)| *decays).count();
    let weight_decay = config_number(&info.config, "weight_decay", 0.1);
    for (weight_decay, indices) in [(weight_decay, 0..decay), (0.0, decay..order.len())] {
        let hyper = serde_json::json!({
            "lr": config_number(&info.config, "learning_rate", 6e-4),
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "amsgrad": false,
            "foreach": null,
            "maximize": false,
            "capturable": false,
            "differentiable": false,
            "fused": null,
            "decoupled_weight_decay": true,
        });
        p.empty_dict();
        p.mark();
        for (k, v) in hyper.as_object().expect("an object") {
            p.str(k);
            p.json(v);
        }
        p.str("betas");
        p.mark();
        p.float(config_number(&info.config, "beta1", 0.9));
        p.float(config_number(&info.config, "beta2", 0.95));
        p.tuple();
        p.str("params");
        p.json(&Json::Array(indices.map(|i| Json::from(i as u64)).collect()));
        p.set_items();
    }
    p.appends();
    p.set_items();

    // nanoGPT's GPTConfig takes exactly these keys.
    p.str("model_args");
    p.json(&serde_json::json!({
        "n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd, "block_size": args.block_size,
        "bias": args.bias, "vocab_size": args.vocab_size, "dropout": args.dropout,
    }));
    p.str("iter_num");
    p.int(info.iter_num as i64);
    p.str("best_val_loss");
    tensor(&mut p, &Tensor::new(info.best_val_loss as f32, &Device::Cpu)?, &mut storages);
    p.str("config");
    p.json(&info.config);
    p.set_items();
    let pickle_bytes = p.finish();

    let mut zip = zip::ZipWriter::new(out);
    let file = |large: bool| {
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(large).with_alignment(64)
    };
    let zipped = |e: zip::result::ZipError| candle_core::Error::Msg(format!("cannot write the checkpoint ({e})"));
    let io = |e: std::io::Error| candle_core::Error::Msg(format!("cannot write the checkpoint ({e})"));
    zip.start_file("ckpt/data.pkl", file(false)).map_err(zipped)?;
    zip.write_all(&pickle_bytes).map_err(io)?;
    zip.start_file("ckpt/byteorder", file(false)).map_err(zipped)?;
    zip.write_all(b"little").map_err(io)?;
    for (key, t) in storages.iter().enumerate() {
        let values = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.start_file(format!("ckpt/data/{key}"), file(bytes.len() as u64 >= u32::MAX as u64)).map_err(zipped)?;
        zip.write_all(&bytes).map_err(io)?;
    }
    zip.start_file("ckpt/version", file(false)).map_err(zipped)?;
    zip.write_all(b"3\n").map_err(io)?;
    zip.finish().map_err(zipped)?.flush().map_err(io)
}

/// Refers to `t` as the next storage, which the zip gets when the pickle is done.
fn tensor(p: &mut pickle::Writer, t: &Tensor, storages: &mut Vec<Tensor>) {
    tensor_ref(p, t.dims(), storages.len());
    storages.push(t.clone());
}

/// `torch._utils._rebuild_tensor_v2(<storage key>, 0, shape, contiguous stride, False, OrderedDict())`.
fn tensor_ref(p: &mut pickle::Writer, dims: &[usize], key: usize) {
    let numel: usize = dims.iter().product();
    p.global("torch._utils", "_rebuild_tensor_v2");
    p.mark();
    p.mark();
    p.str("storage");
    p.global("torch", "FloatStorage");
    p.str(&key.to_string());
    p.str("cpu");
    p.int(numel as i64);
    p.tuple();
    p.persistent_id();
    p.int(0);
    p.mark();
    dims.iter().for_each(|&d| p.int(d as i64));
    p.tuple();
    p.mark();
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides.iter().for_each(|&s| p.int(s as i64));
    p.tuple();
    p.bool(false);
    p.global("collections", "OrderedDict");
    p.mark();
    p.tuple();
    p.reduce();
    p.tuple();
    p.reduce();
}
