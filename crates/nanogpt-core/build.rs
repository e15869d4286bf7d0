//! With the `cuda` feature, compiles the engine's CUDA kernels (src/kernels/cuda/kernels.cu) to one PTX
//! module with nvcc, which the engine embeds and loads at run time. nvcc is `$CUDA_ROOT/bin/nvcc` or the
//! one on PATH (scripts/build-cuda.sh sets CUDA_ROOT); the PTX targets `compute_$CUDA_COMPUTE_CAP`
//! (default 80, the first architecture with bf16 arithmetic), which the driver compiles for newer GPUs too.
//! It also compiles src/kernels/cuda/attention_cudnn.cpp, cuDNN's attention, with the C++ compiler against the
//! CUDA headers and those of cuDNN and the cuDNN frontend in `$NANOGPT_CUDNN_INCLUDE` (scripts/setup-cuda.sh
//! installs them); it loads libcudnn.so.9 at run time, so nothing links cuDNN.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::{env, fs};

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NANOGPT_CUDNN_INCLUDE");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for entry in fs::read_dir("src/kernels/cuda").unwrap() {
        println!("cargo:rerun-if-changed={}", entry.unwrap().path().display());
    }
    let nvcc = env::var_os("CUDA_ROOT").map_or_else(|| PathBuf::from("nvcc"), |root| PathBuf::from(root).join("bin/nvcc"));
    let compute_cap: u32 = match env::var("CUDA_COMPUTE_CAP") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP must be a compute capability without its dot, like 80 or 90; got `{value}`")),
        Err(_) => 80,
    };
    // The tensor-core kernels multiply bfloat16 (mma.sync .bf16, cp.async), which compute capability 8.0 brought.
    if compute_cap < 80 {
        panic!("CUDA_COMPUTE_CAP={compute_cap}: the engine's CUDA kernels need compute capability 8.0 or newer (A100, RTX 30xx and later); set 80 or above");
    }
    // cuda.rs compares it with the GPU it opens: PTX for a newer architecture does not load on an older one.
    println!("cargo:rustc-env=NANOGPT_CUDA_COMPUTE_CAP={compute_cap}");
    let ptx = PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    // nvcc (about 20 s) runs while the C++ compiler builds cuDNN's attention (about a minute): the build script
    // takes the longer of the two.
    let kernels = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("src/kernels/cuda/kernels.cu")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): set CUDA_ROOT to the CUDA toolkit, or run scripts/build-cuda.sh", nvcc.display()));
    compile_cudnn_attention(&nvcc);
    let output = kernels.wait_with_output().unwrap_or_else(|e| panic!("nvcc did not finish: {e}"));
    if !output.status.success() {
        panic!("nvcc failed to compile src/kernels/cuda/kernels.cu:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

fn compile_cudnn_attention(nvcc: &Path) {
    let cudnn_include = env::var_os("NANOGPT_CUDNN_INCLUDE").map(PathBuf::from).unwrap_or_default();
    if !cudnn_include.join("cudnn_frontend.h").exists() || !cudnn_include.join("cudnn.h").exists() {
        panic!(
            "NANOGPT_CUDNN_INCLUDE={}: no cudnn.h and cudnn_frontend.h there; run `eval \"$(bash scripts/setup-cuda.sh --cudnn-headers)\"`, or build with scripts/build-cuda.sh",
            cudnn_include.display()
        );
    }
    // cuda.h and cuda_runtime_api.h: beside nvcc's bin/, in the toolkit's include/.
    let cuda_include = match nvcc.parent() {
        Some(bin) if !bin.as_os_str().is_empty() => bin.join("../include"),
        _ => which_nvcc_include(),
    };
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .file("src/kernels/cuda/attention_cudnn.cpp")
        .include(&cuda_include)
        .include(&cudnn_include)
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .define("CUDNN_FRONTEND_SKIP_JSON_LIB", None)
        // The frontend's headers are NVIDIA's; their warnings are not this crate's to fix.
        .warnings(false)
        .compile("nanogpt_cudnn_attention");
}

/// The include/ folder of the toolkit whose nvcc is on PATH.
fn which_nvcc_include() -> PathBuf {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .find(|dir| dir.join("nvcc").is_file())
        .map(|bin| bin.join("../include"))
        .unwrap_or_else(|| panic!("no nvcc on PATH: set CUDA_ROOT to the CUDA toolkit, or run scripts/build-cuda.sh"))
}
