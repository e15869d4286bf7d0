#!/usr/bin/env bash
# Builds the CUDA engine as its own Node.js addon, native/cuda/nanogpt.linux-x64-gnu.node, beside the CPU one
# (native/nanogpt.linux-x64-gnu.node): a CUDA build cannot even be loaded where the NVIDIA driver is missing.
#
# With --nccl (npm run build:cuda:nccl) it builds the engine with NCCL for data-parallel runs on GPUs, into
# native/cuda-nccl/. That is a third file rather than the CUDA addon itself because cudarc links libnccl.so.2
# (a DT_NEEDED entry): the dynamic linker would refuse to load the addon on every machine without NCCL on its path,
# single-GPU ones included. The link needs NCCL here too: scripts/setup-cuda.sh --with-nccl installs its wheel.
#
#   CUDA_COMPUTE_CAP   GPU architecture of the kernels, e.g. 90 (H100/H200), 89 (L4/4090), 80 (A100);
#                      default: the first GPU's, from nvidia-smi, else 90
#   CUDA_ROOT          toolkit to build with; default: the one scripts/setup-cuda.sh finds or installs
#   NANOGPT_CUDNN_INCLUDE  cuDNN's and the cuDNN frontend's headers; default: scripts/setup-cuda.sh installs them
#
# It compiles for x86-64-v3 (AVX2), not for this machine's CPU, so that the addon runs on the GPU machine
# too, and in target/cuda so that it does not rebuild the CPU addon's dependencies.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

features=cuda out=native/cuda setup=()
if [ "${1:-}" = --nccl ]; then
  shift
  features=nccl out=native/cuda-nccl setup=(--with-nccl)
fi
if [ -z "${CUDA_ROOT:-}" ] || ! command -v nvcc >/dev/null 2>&1 || [ "$features" = nccl ]; then
  eval "$(bash scripts/setup-cuda.sh "${setup[@]}")"
fi
if [ -z "${NANOGPT_CUDNN_INCLUDE:-}" ]; then
  eval "$(bash scripts/setup-cuda.sh --cudnn-headers)"
fi
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ' || true)
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
fi
export CUDA_COMPUTE_CAP
# RUSTFLAGS takes precedence over .cargo/config.toml's target-cpu=native.
export RUSTFLAGS="-C target-cpu=x86-64-v3"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
# candle-kernels' build compiles candle's CUDA sources with nvcc, most of a cold build, on half the cores unless
# told otherwise: one at a time on a 2-core machine.
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
echo "build-cuda: features $features, compute capability $CUDA_COMPUTE_CAP, toolkit $CUDA_ROOT, target dir $CARGO_TARGET_DIR" >&2

cargo build --release -p nanogpt-napi --features "$features" "$@"
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/libnanogpt_napi.so" "$out/nanogpt.linux-x64-gnu.node"
echo "build-cuda: wrote $out/nanogpt.linux-x64-gnu.node" >&2
