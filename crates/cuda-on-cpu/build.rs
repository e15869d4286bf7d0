//! Compiles the engine's CUDA kernels, and this crate's own test kernels, as C++ with the emulator's
//! definitions of CUDA's built-ins, and a function registering each kernel entry point (every
//! `extern "C" __global__ void name(` line, `__launch_bounds__(..)` allowed before the name) by name.

use std::path::{Path, PathBuf};
use std::{env, fs};

const ENTRY: &str = "extern \"C\" __global__ void ";

fn main() {
    let kernels = Path::new("../nanogpt-core/src/kernels/cuda");
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels)
        .expect("kernels/cuda of nanogpt-core")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    sources.push(PathBuf::from("src/emulator_checks.cu"));
    let mut entries = Vec::new();
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
        for line in fs::read_to_string(source).unwrap().lines() {
            if let Some(rest) = line.strip_prefix(ENTRY) {
                // `__launch_bounds__(threads, blocks)` may come before the name.
                let rest = rest.strip_prefix("__launch_bounds__(").map_or(rest, |bounds| bounds.split_once(')').unwrap().1);
                entries.push(rest.split('(').next().unwrap().trim().to_string());
            }
        }
    }
    println!("cargo:rerun-if-changed=src/cuda_on_cpu.h");
    println!("cargo:rerun-if-changed=src/launcher.cpp");

    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let registry: String = entries.iter().map(|name| format!("  cuda_on_cpu::register_kernel(\"{name}\", &{name});\n")).collect();
    let includes: String = [kernels.join("kernels.cu"), PathBuf::from("src/emulator_checks.cu")]
        .iter()
        .map(|file| format!("#include \"{}\"\n", fs::canonicalize(file).unwrap().display()))
        .collect();
    let unit = out.join("kernels_on_cpu.cpp");
    fs::write(&unit, format!("{includes}extern \"C\" void cuda_on_cpu_register_all() {{\n{registry}}}\n")).unwrap();

    let header = fs::canonicalize("src/cuda_on_cpu.h").unwrap();
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .warnings(false)
        .flag("-include")
        .flag(header.to_str().unwrap())
        .file(&unit)
        .file("src/launcher.cpp")
        .compile("cuda_on_cpu");
}
