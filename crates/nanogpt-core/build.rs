//! With the `cuda` feature, compiles the engine's CUDA kernels (src/kernels/cuda/kernels.cu) to one PTX
//! module with nvcc, which the engine embeds and loads at run time. nvcc is `$CUDA_ROOT/bin/nvcc` or the
//! one on PATH (scripts/build-cuda.sh sets CUDA_ROOT); the PTX targets `compute_$CUDA_COMPUTE_CAP`
//! (default 80, the first architecture with bf16 arithmetic), which the driver compiles for newer GPUs too.

use std::path::PathBuf;
use std::process::Command;
use std::{env, fs};

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for entry in fs::read_dir("src/kernels/cuda").unwrap() {
        println!("cargo:rerun-if-changed={}", entry.unwrap().path().display());
    }
    let nvcc = env::var_os("CUDA_ROOT").map_or_else(|| PathBuf::from("nvcc"), |root| PathBuf::from(root).join("bin/nvcc"));
    let compute_cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let ptx = PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.ptx");
    let output = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg("src/kernels/cuda/kernels.cu")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}): set CUDA_ROOT to the CUDA toolkit, or run scripts/build-cuda.sh", nvcc.display()));
    if !output.status.success() {
        panic!("nvcc failed to compile src/kernels/cuda/kernels.cu:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}
