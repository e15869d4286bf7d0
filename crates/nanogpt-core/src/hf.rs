//! Hugging Face GPT-2 checkpoints (`config.json` + `model.safetensors` of a `GPT2LMHeadModel`), read
//! and written with one name and layout table, as nanoGPT's `from_pretrained` reads them (HF's Conv1D weights transposed).
//!
//! Differences from nanoGPT's state dict: keys may lack the `transformer.` prefix (the hub's own
//! files do), the attention mask buffers `attn.bias` / `attn.masked_bias` may be present, the
//! tied `lm_head.weight` may be present, and the four Conv1D weights are stored (in, out).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;
use serde_json::json;

use crate::model::{Gelu, Gpt, ModelArgs};

/// Weights that OpenAI's Conv1D layers store as (in_features, out_features): the transpose of ours.
const CONV1D: [&str; 4] = [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"];

/// Buffers of HF's attention, not parameters (the leading dot keeps `attn.c_attn.bias` out).
const BUFFERS: [&str; 2] = [".attn.bias", ".attn.masked_bias"];

/// The `config.json` fields that fix the architecture.
#[derive(Deserialize)]
struct HfConfig {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    n_positions: usize,
    vocab_size: usize,
    #[serde(default = "default_activation")]
    activation_function: String,
    n_inner: Option<usize>,
}

fn default_activation() -> String {
    "gelu_new".into()
}

/// The model arguments of a HF GPT-2 `config.json`; GPT-2 always has biases.
pub fn model_args(config_json: &str, dropout: f64) -> Result<ModelArgs> {
    let config: HfConfig =
        serde_json::from_str(config_json).map_err(|e| candle_core::Error::Msg(format!("config.json is not a GPT-2 config ({e})")))?;
    let gelu = match config.activation_function.as_str() {
        "gelu_new" | "gelu_pytorch_tanh" => Gelu::Tanh,
        "gelu" => Gelu::Erf,
        other => {
            candle_core::bail!("config.json has activation_function `{other}`; only gelu_new, gelu_pytorch_tanh and gelu are supported")
        }
    };
    if let Some(inner) = config.n_inner.filter(|&inner| inner != 4 * config.n_embd) {
        candle_core::bail!("config.json has n_inner {inner}; only the GPT-2 default of 4 * n_embd is supported");
    }
    let args = ModelArgs {
        n_layer: config.n_layer,
        n_head: config.n_head,
        n_embd: config.n_embd,
        block_size: config.n_positions,
        vocab_size: config.vocab_size,
        bias: true,
        dropout,
        gelu,
    };
    args.validate()?;
    Ok(args)
}

/// A model built from a HF GPT-2 `config.json` and the tensors of its `model.safetensors`.
pub fn import(config_json: &str, tensors: HashMap<String, Tensor>, dropout: f64, device: &Device) -> Result<Gpt> {
    let args = model_args(config_json, dropout)?;
    let model = Gpt::empty(&args, device)?;
    model.load(&to_nanogpt(tensors)?)?;
    Ok(model)
}

/// Renames HF tensors to nanoGPT's names and orientation, dropping buffers and the tied output layer.
fn to_nanogpt(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut lm_head = None;
    let mut out = HashMap::with_capacity(tensors.len());
    for (key, tensor) in tensors {
        if key == "lm_head.weight" {
            lm_head = Some(tensor);
            continue;
        }
        let name = key.strip_prefix("transformer.").unwrap_or(&key);
        if BUFFERS.iter().any(|b| name.ends_with(b)) {
            continue;
        }
        let tensor = if CONV1D.iter().any(|c| name.ends_with(c)) { tensor.t()?.contiguous()? } else { tensor };
        out.insert(format!("transformer.{name}"), tensor);
    }
    if let (Some(head), Some(wte)) = (lm_head, out.get("transformer.wte.weight")) {
        let same = head.dims() == wte.dims()
            && (head.to_dtype(DType::F32)? - wte.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
        if !same {
            candle_core::bail!("lm_head.weight differs from wte.weight; only GPT-2 models with tied embeddings are supported");
        }
    }
    Ok(out)
}

/// `model`'s weights in HF GPT-2 layout, ready to serialise as `model.safetensors`. HF's GPT-2 always
/// has biases, so a model without them gets zeros, which compute the same.
pub fn export_tensors(model: &Gpt) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, var) in model.named_parameters() {
        let t = var.as_tensor().to_device(&Device::Cpu)?;
        let layer = name.strip_suffix(".weight").filter(|l| !l.ends_with(".wte") && !l.ends_with(".wpe"));
        if let (Some(layer), false) = (layer, model.args.bias) {
            // Our weights are (out, in) and LayerNorm's are (n): dim 0 is the bias size either way.
            out.push((format!("{layer}.bias"), Tensor::zeros(t.dim(0)?, DType::F32, &Device::Cpu)?));
        }
        let t = if CONV1D.iter().any(|c| name.ends_with(c)) { t.t()?.contiguous()? } else { t };
        out.push((name, t));
    }
    Ok(out)
}

/// The HF `config.json` of a model with `args`, as `GPT2LMHeadModel` writes it.
pub fn export_config(args: &ModelArgs) -> String {
    let activation = match args.gelu {
        Gelu::Tanh => "gelu_new",
        Gelu::Erf => "gelu",
    };
    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_embd": args.n_embd,
        "n_positions": args.block_size,
        "n_ctx": args.block_size,
        "vocab_size": args.vocab_size,
        "n_inner": null,
        "activation_function": activation,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "attn_pdrop": args.dropout,
        "embd_pdrop": args.dropout,
        "resid_pdrop": args.dropout,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
    });
    format!("{}\n", serde_json::to_string_pretty(&config).expect("a JSON value serialises"))
}
