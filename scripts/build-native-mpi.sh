#!/usr/bin/env bash
# Builds the native engine with MPI, for data-parallel training across processes (`train --nproc_per_node=N`, or
# `mpirun -np N npx nanogpt-rs train ...`), as its own addon beside the plain one: native/mpi/nanogpt.linux-x64-gnu.node.
# It links the system's OpenMPI (libmpi.so), so it cannot be loaded where OpenMPI is missing; the plain addon
# needs nothing. Debian/Ubuntu: apt-get install -y libopenmpi-dev openmpi-bin libclang-dev (the mpi crate
# generates its bindings with libclang).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v mpicc >/dev/null 2>&1; then
  echo "error: build:native:mpi needs OpenMPI's development files (no mpicc on PATH); install them: apt-get install -y libopenmpi-dev openmpi-bin libclang-dev" >&2
  exit 1
fi

cargo build --release -p nanogpt-napi --features mpi "$@"
mkdir -p native/mpi
cp target/release/libnanogpt_napi.so native/mpi/nanogpt.linux-x64-gnu.node
echo "build-native-mpi: wrote native/mpi/nanogpt.linux-x64-gnu.node" >&2
