//! Hugging Face GPT-2 import and export against `test/fixtures/hf-gpt2-tiny`: a 2-layer GPT-2 saved
//! by transformers, with the logits, loss and greedy continuation transformers computed for it.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use nanogpt_core::hf;
use nanogpt_core::model::Mode;
use nanogpt_core::sample::SampleArgs;
use nanogpt_core::{files, Engine, Gelu, ModelArgs, OptimizerArgs};

/// The fixture ships with the repository under test/fixtures.
fn fixture(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/fixtures/hf-gpt2-tiny").join(file)
}

fn read(file: &str) -> Vec<u8> {
    let path = fixture(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read the fixture {} ({e})", path.display()))
}

fn config_json() -> String {
    String::from_utf8(read("config.json")).unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load_buffer(&read("reference.safetensors"), &Device::Cpu).unwrap()
}

fn fixture_engine() -> Result<Engine> {
    Engine::from_hf_gpt2(&config_json(), &read("model.safetensors"), 0.0, "cpu")
}

fn input_ids(reference: &HashMap<String, Tensor>) -> Result<Tensor> {
    reference["input_ids"].to_dtype(DType::U32)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn serialize(tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t.clone())), None).unwrap()
}

#[test]
fn config_json_gives_the_architecture() -> Result<()> {
    let args = hf::model_args(&config_json(), 0.1)?;
    let expected =
        ModelArgs { n_layer: 2, n_head: 4, n_embd: 64, block_size: 64, vocab_size: 1000, bias: true, dropout: 0.1, gelu: Gelu::Tanh };
    assert_eq!(args, expected);
    let with = |activation: &str| config_json().replace("\"gelu_new\"", &format!("\"{activation}\""));
    assert_eq!(hf::model_args(&with("gelu_pytorch_tanh"), 0.0)?.gelu, Gelu::Tanh);
    assert_eq!(hf::model_args(&with("gelu"), 0.0)?.gelu, Gelu::Erf);
    let err = hf::model_args(&with("relu"), 0.0).unwrap_err().to_string();
    assert!(err.contains("activation_function `relu`"), "{err}");
    Ok(())
}

#[test]
fn logits_and_loss_match_transformers() -> Result<()> {
    let reference = reference();
    let engine = fixture_engine()?;
    let ids = input_ids(&reference)?;
    let logits = engine.model().logits(&ids)?;
    let diff = max_abs_diff(&logits, &reference["logits"]);
    assert!(diff <= 1e-4, "logits differ from transformers' by {diff}");

    // transformers' loss with labels = input_ids: each position predicts the next id; the last predicts nothing.
    let (b, t) = ids.dims2()?;
    let next = reference["input_ids"].i((.., 1..))?;
    let targets = Tensor::cat(&[next, Tensor::full(-1i64, (b, 1), &Device::Cpu)?], 1)?;
    assert_eq!(targets.dims(), &[b, t]);
    let loss = engine.model().loss(&ids, &targets, &Mode::Eval)?.to_scalar::<f32>()?;
    let expected = reference["loss"].to_scalar::<f32>()?;
    assert!((loss - expected).abs() <= 1e-5, "loss {loss}, transformers {expected}");
    Ok(())
}

#[test]
fn greedy_continuation_matches_transformers() -> Result<()> {
    let reference = reference();
    let engine = fixture_engine()?;
    let greedy: Vec<u32> = reference["greedy"].squeeze(0)?.to_dtype(DType::U32)?.to_vec1()?;
    let prompt_len = 12;
    let prompt: Vec<u32> = input_ids(&reference)?.i((0, ..prompt_len))?.to_vec1()?;
    assert_eq!(&greedy[..prompt_len], prompt.as_slice(), "the reference continues the first 12 input ids");
    let args = SampleArgs { max_new_tokens: greedy.len() - prompt_len, temperature: 1.0, top_k: Some(1), seed: 0 };
    assert_eq!(engine.generate(&prompt, &args)?, greedy);
    Ok(())
}

#[test]
fn import_accepts_hub_spellings_and_rejects_untied_heads() -> Result<()> {
    let reference = reference();
    let ids = input_ids(&reference)?;
    let original = candle_core::safetensors::load_buffer(&read("model.safetensors"), &Device::Cpu)?;
    // The hub's files: no `transformer.` prefix, mask buffers, and the tied output layer spelled out.
    let mut hub: HashMap<String, Tensor> =
        original.iter().map(|(n, t)| (n.strip_prefix("transformer.").unwrap().to_string(), t.clone())).collect();
    for i in 0..2 {
        hub.insert(format!("h.{i}.attn.bias"), Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu)?);
        hub.insert(format!("h.{i}.attn.masked_bias"), Tensor::new(-1e4f32, &Device::Cpu)?);
    }
    hub.insert("lm_head.weight".into(), original["transformer.wte.weight"].clone());
    let engine = Engine::from_hf_gpt2(&config_json(), &serialize(&hub), 0.0, "cpu")?;
    let diff = max_abs_diff(&engine.model().logits(&ids)?, &reference["logits"]);
    assert!(diff <= 1e-4, "logits differ from transformers' by {diff}");

    hub.insert("lm_head.weight".into(), original["transformer.wte.weight"].affine(2.0, 0.0)?);
    let err = Engine::from_hf_gpt2(&config_json(), &serialize(&hub), 0.0, "cpu").err().expect("untied heads are refused");
    assert!(err.to_string().contains("lm_head.weight differs"), "{err}");

    hub.remove("h.1.mlp.c_fc.weight");
    hub.remove("lm_head.weight");
    let err = Engine::from_hf_gpt2(&config_json(), &serialize(&hub), 0.0, "cpu").err().expect("a missing tensor is refused");
    assert!(err.to_string().contains("transformer.h.1.mlp.c_fc.weight"), "{err}");
    Ok(())
}

/// A model of the fixture's shape trained a few steps, so that no weight is at its initial value.
fn trained(bias: bool, gelu: Gelu) -> Result<Engine> {
    let args = ModelArgs { n_layer: 2, n_head: 4, n_embd: 64, block_size: 64, vocab_size: 1000, bias, dropout: 0.0, gelu };
    let mut engine = Engine::new(&args, 3, "cpu")?;
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 })?;
    let x: Vec<u32> = (0..2 * 64).map(|i| (i * 37 % 1000) as u32).collect();
    let y: Vec<i32> = x.iter().map(|&t| ((t + 1) % 1000) as i32).collect();
    for _ in 0..3 {
        engine.forward_backward(&x, &y, 2, 1.0)?;
        engine.step(1e-2)?;
    }
    Ok(engine)
}

#[test]
fn export_round_trips_and_has_the_hf_layout() -> Result<()> {
    let fixture = candle_core::safetensors::load_buffer(&read("model.safetensors"), &Device::Cpu)?;
    let layout = |tensors: &HashMap<String, Tensor>| {
        let mut names: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
        names.sort();
        names
    };
    let ids = input_ids(&reference())?;
    for (bias, gelu, activation) in [(true, Gelu::Tanh, "gelu_new"), (false, Gelu::Erf, "gelu")] {
        let engine = trained(bias, gelu)?;
        let bytes = files::to_vec(|out| engine.export_hf(out))?;
        let config = engine.hf_config();
        let exported = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        assert_eq!(layout(&exported), layout(&fixture), "bias={bias}");

        let json: serde_json::Value = serde_json::from_str(&config).unwrap();
        assert_eq!(json["model_type"], "gpt2");
        assert_eq!(json["architectures"], serde_json::json!(["GPT2LMHeadModel"]));
        assert_eq!(json["activation_function"], activation);
        assert_eq!(json["tie_word_embeddings"], true);
        assert_eq!(json["layer_norm_epsilon"], 1e-5);
        for key in ["n_layer", "n_head", "n_embd", "n_positions", "vocab_size"] {
            assert_eq!(json[key], serde_json::from_str::<serde_json::Value>(&config_json()).unwrap()[key], "{key}");
        }
        assert_eq!(json["n_ctx"], 64);

        let back = Engine::from_hf_gpt2(&config, &bytes, 0.0, "cpu")?;
        assert_eq!(back.model_args().gelu, gelu);
        let diff = max_abs_diff(&back.model().logits(&ids)?, &engine.model().logits(&ids)?);
        assert_eq!(diff, 0.0, "bias={bias}: the re-imported export computes different logits");
    }
    Ok(())
}

#[test]
fn crop_block_size_keeps_the_first_positions() -> Result<()> {
    let reference = reference();
    let ids = input_ids(&reference)?;
    let mut engine = fixture_engine()?;
    engine.crop_block_size(24)?;
    assert_eq!(engine.model_args().block_size, 24);
    assert_eq!(engine.model().wpe.dims(), &[24, 64]);
    let diff = max_abs_diff(&engine.model().logits(&ids)?, &reference["logits"]);
    assert!(diff <= 1e-4, "cropping changed the logits by {diff}");
    let too_long = Tensor::zeros((1, 25), DType::U32, &Device::Cpu)?;
    assert!(engine.model().logits(&too_long).is_err(), "25 positions no longer fit");
    let err = engine.crop_block_size(25).unwrap_err().to_string();
    assert!(err.contains("between 1 and the model's 24"), "{err}");
    engine.configure_optimizer(&OptimizerArgs { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 })?;
    assert!(engine.crop_block_size(8).is_err(), "cropping after the optimizer holds the weights is refused");
    Ok(())
}
