//! nanoGPT's `ckpt.pt` against `test/fixtures/nanogpt`: checkpoints written by nanoGPT's own train.py, with
//! the losses nanoGPT's model.py computed from them (see make_fixtures.py there).

use std::path::{Path, PathBuf};

use nanogpt_core::engine::nanogpt_checkpoint_info;
use nanogpt_core::torch_checkpoint::CheckpointInfo;
use nanogpt_core::{files, pickle, Engine, ModelArgs, OptimizerArgs};
use serde_json::Value;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/fixtures/nanogpt").join(path)
}

fn fixture_str(path: &str) -> String {
    fixture(path).to_str().unwrap().to_string()
}

fn expected(case: &str) -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()[case].clone()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nanogpt-rs-torch-ckpt-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tokens<T: TryFrom<i64>>(v: &Value) -> Vec<T> {
    v.as_array().unwrap().iter().map(|t| T::try_from(t.as_i64().unwrap()).ok().unwrap()).collect()
}

fn info(path: &str) -> CheckpointInfo {
    nanogpt_checkpoint_info(&files::map(path).unwrap()).unwrap()
}

fn load(path: &str) -> Engine {
    Engine::from_nanogpt_checkpoint(&info(path).model_args, &files::map(path).unwrap(), "cpu").unwrap()
}

fn window_loss(engine: &Engine, case: &Value) -> f32 {
    let w = &case["windows"];
    engine.eval_loss(&tokens::<u32>(&w["x"]), &tokens::<i32>(&w["y"]), w["batch_size"].as_u64().unwrap() as usize).unwrap()
}

/// Resumes as train.py does: nanoGPT's optimizer settings, the checkpoint's AdamW state, then the recorded
/// batches at the recorded learning rates. Returns each step's loss and the window loss after them.
fn resume(engine: &mut Engine, path: &str, case: &Value) -> (Vec<f32>, f32) {
    let r = &case["resume"];
    let f = |k: &str| r[k].as_f64().unwrap();
    engine
        .configure_optimizer(&OptimizerArgs {
            weight_decay: f("weight_decay"),
            beta1: f("beta1"),
            beta2: f("beta2"),
            grad_clip: f("grad_clip"),
        })
        .unwrap();
    engine.load_nanogpt_optimizer(&files::map(path).unwrap()).unwrap();
    let batch_size = r["batch_size"].as_u64().unwrap() as usize;
    let mut losses = Vec::new();
    for (batch, lr) in r["batches"].as_array().unwrap().iter().zip(r["lrs"].as_array().unwrap()) {
        losses.push(engine.forward_backward(&tokens::<u32>(&batch["x"]), &tokens::<i32>(&batch["y"]), batch_size, 1.0).unwrap());
        engine.step(lr.as_f64().unwrap()).unwrap();
    }
    (losses, window_loss(engine, case))
}

/// The first line of an error: the message, without the backtrace candle appends when RUST_BACKTRACE is set.
fn first_line(err: impl ToString) -> String {
    err.to_string().lines().next().unwrap_or_default().to_string()
}

/// Largest absolute difference between our losses and nanoGPT's.
fn max_diff(ours: &[f32], theirs: &Value) -> f64 {
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    ours.iter().zip(theirs).map(|(a, b)| (*a as f64 - b.as_f64().unwrap()).abs()).fold(0.0, f64::max)
}

#[test]
fn reads_what_train_py_saved() {
    for case in ["plain", "compiled"] {
        let got = info(&fixture_str(&format!("{case}/ckpt.pt")));
        let want = expected(case);
        assert_eq!(got.iter_num, want["iter_num"].as_u64().unwrap());
        assert!((got.best_val_loss - want["best_val_loss"].as_f64().unwrap()).abs() < 1e-6);
        let args = &want["model_args"];
        let expected_args = ModelArgs {
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
            block_size: 32,
            vocab_size: args["vocab_size"].as_u64().unwrap() as usize,
            bias: args["bias"].as_bool().unwrap(),
            dropout: 0.0,
            gelu: Default::default(),
        };
        assert_eq!(got.model_args, expected_args);
        assert_eq!(got.config["dataset"], "shakespeare_char");
        assert_eq!(got.config["n_embd"], 16);
    }
}

/// The same loss as nanoGPT's model on fixed windows of val.bin, with and without torch.compile's
/// `_orig_mod.` prefix and the `attn.bias` mask buffers.
#[test]
fn loss_matches_nanogpt() {
    for case in ["plain", "compiled"] {
        let engine = load(&fixture_str(&format!("{case}/ckpt.pt")));
        let want = expected(case)["val_loss"].as_f64().unwrap();
        let got = window_loss(&engine, &expected(case)) as f64;
        assert!((got - want).abs() < 1e-5, "{case}: loss {got}, nanoGPT {want}");
    }
}

/// Ten steps resumed from the checkpoint's AdamW state match nanoGPT's ten resumed steps on the same batches.
#[test]
fn resume_matches_nanogpt() {
    for case in ["plain", "compiled"] {
        let path = fixture_str(&format!("{case}/ckpt.pt"));
        let want = expected(case);
        let (losses, after) = resume(&mut load(&path), &path, &want);
        let diff = max_diff(&losses, &want["resume"]["losses"]);
        assert!(diff < 1e-5, "{case}: resumed losses {losses:?} differ from nanoGPT's by {diff}");
        let want_after = want["resume"]["val_loss_after"].as_f64().unwrap();
        println!(
            "{case}: 10 resumed losses within {diff:.1e} of nanoGPT's, loss after them within {:.1e}",
            (after as f64 - want_after).abs()
        );
        assert!((after as f64 - want_after).abs() < 1e-5, "{case}: loss after resuming {after}, nanoGPT {want_after}");
    }
}

/// The payload's global is named and refused before anything could run it.
#[test]
fn refuses_a_pickle_that_runs_code() {
    let marker = Path::new("/tmp/nanogpt-rs-pickle-payload-ran");
    let _ = std::fs::remove_file(marker);
    let path = fixture_str("malicious/ckpt.pt");
    let err = first_line(nanogpt_checkpoint_info(&files::map(&path).unwrap()).unwrap_err());
    assert!(err.contains("`posix.system`") || err.contains("`os.system`"), "{err}");
    assert!(err.ends_with("nothing in the file is run)"), "{err}");
    let args = info(&fixture_str("plain/ckpt.pt")).model_args;
    assert!(Engine::from_nanogpt_checkpoint(&args, &files::map(&path).unwrap(), "cpu").is_err());
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn refuses_other_globals_with_their_name() {
    // protocol 2: GLOBAL builtins eval, then a call
    let mut bytes = vec![0x80, 2];
    bytes.extend_from_slice(b"cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.");
    let err = pickle::read(&bytes).unwrap_err().to_string();
    assert!(err.contains("`builtins.eval`"), "{err}");
}

#[test]
fn damaged_files_give_one_line_errors() {
    let plain = std::fs::read(fixture("plain/ckpt.pt")).unwrap();
    let args = info(&fixture_str("plain/ckpt.pt")).model_args;
    for cut in [plain.len() / 2, plain.len() - 30, 100] {
        let bytes = &plain[..cut];
        let err = nanogpt_checkpoint_info(bytes).unwrap_err().to_string();
        assert!(err.starts_with("not a readable PyTorch checkpoint"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(Engine::from_nanogpt_checkpoint(&args, bytes, "cpu").is_err());
    }
    let path = fixture_str("wrong_arch/ckpt.pt");
    let err = first_line(Engine::from_nanogpt_checkpoint(&info(&path).model_args, &files::map(&path).unwrap(), "cpu").err().unwrap());
    assert!(err.contains("transformer.wte.weight") && err.ends_with("the model expects [58, 24]"), "{err}");
}

/// A written checkpoint reads back to the same model, optimizer state and info.
#[test]
fn export_round_trips() {
    let path = fixture_str("compiled/ckpt.pt");
    let want = expected("compiled");
    let mut engine = load(&path);
    let r = &want["resume"];
    let f = |k: &str| r[k].as_f64().unwrap();
    engine
        .configure_optimizer(&OptimizerArgs {
            weight_decay: f("weight_decay"),
            beta1: f("beta1"),
            beta2: f("beta2"),
            grad_clip: f("grad_clip"),
        })
        .unwrap();
    engine.load_nanogpt_optimizer(&files::map(&path).unwrap()).unwrap();
    let out = temp_dir("round-trip").join("ckpt.pt");
    let out = out.to_str().unwrap();
    files::write(out, |sink| engine.save_nanogpt_checkpoint(sink, &info(&path))).unwrap();
    assert_eq!(files::to_vec(|sink| engine.save_nanogpt_checkpoint(sink, &info(&path))).unwrap(), std::fs::read(out).unwrap());

    assert_eq!(info(out), info(&path));
    let mut again = load(out);
    assert_eq!(window_loss(&again, &want), window_loss(&load(&path), &want));
    let (losses, _) = resume(&mut again, out, &want);
    assert!(max_diff(&losses, &want["resume"]["losses"]) < 1e-5, "{losses:?}");
}

/// nanoGPT's own loader (torch.load with weights_only, AdamW.load_state_dict) takes the written file and
/// computes the same losses. Needs python3 with torch; reports itself skipped without.
#[test]
fn export_loads_in_pytorch() {
    let has_torch = std::process::Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    if !has_torch {
        eprintln!("SKIPPED export_loads_in_pytorch: python3 with torch is not installed");
        return;
    }
    let path = fixture_str("plain/ckpt.pt");
    let want = expected("plain");
    let engine = load(&path);
    let mut with_optimizer = load(&path);
    let r = &want["resume"];
    let f = |k: &str| r[k].as_f64().unwrap();
    with_optimizer
        .configure_optimizer(&OptimizerArgs {
            weight_decay: f("weight_decay"),
            beta1: f("beta1"),
            beta2: f("beta2"),
            grad_clip: f("grad_clip"),
        })
        .unwrap();
    with_optimizer.load_nanogpt_optimizer(&files::map(&path).unwrap()).unwrap();
    let dir = temp_dir("pytorch");
    let case = dir.join("case.json");
    std::fs::write(&case, want.to_string()).unwrap();
    let checkpoint_info = info(&path);
    for (name, engine) in [("weights-only", &engine), ("with-optimizer", &with_optimizer)] {
        let out = dir.join(format!("{name}.pt"));
        files::write(out.to_str().unwrap(), |sink| engine.save_nanogpt_checkpoint(sink, &checkpoint_info)).unwrap();
        let run = std::process::Command::new("python3").arg(fixture("check_export.py")).arg(&out).arg(&case).output().unwrap();
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let got: Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(got["iter_num"], want["iter_num"]);
        assert!((got["val_loss"].as_f64().unwrap() - want["val_loss"].as_f64().unwrap()).abs() < 1e-5, "{name}: {got}");
        if name == "with-optimizer" {
            let losses: Vec<f32> = got["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap() as f32).collect();
            assert!(max_diff(&losses, &want["resume"]["losses"]) < 1e-5, "{name}: {got}");
        }
    }
}

#[test]
fn reads_meta_pkl_as_json() {
    let meta: Value = serde_json::from_str(&pickle::to_json_string(&std::fs::read(fixture("plain/meta.pkl")).unwrap()).unwrap()).unwrap();
    let vocab_size = meta["vocab_size"].as_u64().unwrap();
    assert_eq!(meta["itos"].as_object().unwrap().len() as u64, vocab_size);
    assert_eq!(meta["stoi"]["\n"], 0);
    assert_eq!(meta["itos"]["0"], "\n");
}

/// Tensors the model does not use are skipped whatever their dtype, e.g. GPT-2's BOOL `attn.bias` masks.
#[test]
fn safetensors_with_bool_buffers_load() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let args =
        ModelArgs { n_layer: 1, n_head: 2, n_embd: 8, block_size: 4, vocab_size: 10, bias: true, dropout: 0.0, gelu: Default::default() };
    let engine = Engine::new(&args, 7, "cpu").unwrap();
    let weights = files::to_vec(|out| engine.save_weights(out)).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let mask = [1u8; 16];
    let steps = 3i64.to_le_bytes();
    let mut views: Vec<(String, TensorView)> = parsed.tensors();
    views.push(("transformer.h.0.attn.bias".into(), TensorView::new(Dtype::BOOL, vec![1, 1, 4, 4], &mask).unwrap()));
    views.push(("num_batches_tracked".into(), TensorView::new(Dtype::I64, vec![1], &steps).unwrap()));
    let bytes = safetensors::serialize(views, None).unwrap();
    let path = temp_dir("bool").join("model.safetensors");
    std::fs::write(&path, &bytes).unwrap();

    let (x, y) = ([1u32, 2, 3, 4, 5, 6, 7, 8], [2i32, 3, 4, 5, 6, 7, 8, 9]);
    let want = engine.eval_loss(&x, &y, 2).unwrap();
    assert_eq!(Engine::from_safetensors(&args, &bytes, "cpu").unwrap().eval_loss(&x, &y, 2).unwrap(), want);
    let mapped = files::map(path.to_str().unwrap()).unwrap();
    assert_eq!(Engine::from_safetensors(&args, &mapped, "cpu").unwrap().eval_loss(&x, &y, 2).unwrap(), want);
}

/// Memo fetches that double a list each time would need 2^40 values from a few hundred bytes: refused early.
#[test]
fn refuses_a_pickle_that_expands_exponentially() {
    let mut bytes = vec![0x80, 2, b']', b'q', 0];
    for i in 0..40u8 {
        // (memo[i], memo[i]) as a list, memoized as i + 1
        bytes.extend_from_slice(&[b']', b'(', b'h', i, b'h', i, b'e', b'q', i + 1]);
    }
    bytes.push(b'.');
    let err = first_line(pickle::read(&bytes).unwrap_err());
    assert!(err.contains("repeats its values far beyond its size"), "{err}");
}
