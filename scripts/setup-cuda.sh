#!/usr/bin/env bash
# Makes a CUDA 13.0 toolkit available for building the CUDA engine (`npm run build:cuda`) on a machine
# without one: when `nvcc` is not on PATH, installs NVIDIA's PyPI wheels (nvcc, headers, cuBLAS, cuRAND,
# NVRTC, the runtime) into .cuda/ in the repository, and writes a link-time stand-in for the driver
# library libcuda.so.1, which only comes with the NVIDIA driver; and, with any toolkit, the headers of cuDNN and
# of the cuDNN frontend into .cuda/cudnn/include. Running it again reuses what is there.
#
# Prints the environment to use, as lines that can be eval'd:
#   eval "$(bash scripts/setup-cuda.sh)"
#   eval "$(bash scripts/setup-cuda.sh --with-nccl)"     # also NCCL, for the `nccl` feature (npm run build:cuda:nccl)
#   eval "$(bash scripts/setup-cuda.sh --cudnn-headers)" # only the cuDNN headers (NANOGPT_CUDNN_INCLUDE)
# Progress goes to stderr.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
prefix=$root/.cuda
log() { echo "setup-cuda: $*" >&2; }
with_nccl=
[ "${1:-}" = --with-nccl ] && with_nccl=1

# NCCL 2.30 (the version of cudarc's NCCL bindings; later 2.x keep its ABI) from NVIDIA's wheel, in a folder of
# its own: pip --target skips a top-level folder (nvidia/) that is already there. Prints its lib/ folder. Only the
# link needs it here; the GPU machine loads its own (e.g. torch's).
nccl_wheel() {
  local lib=$prefix/nccl/nvidia/nccl/lib
  if [ ! -e "$lib/libnccl.so.2" ]; then
    log "installing nvidia-nccl-cu13==2.30.* into $prefix/nccl"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix/nccl" 'nvidia-nccl-cu13==2.30.*' >&2
  fi
  # The linker looks for libnccl.so; the wheel ships only the soname.
  ln -sf libnccl.so.2 "$lib/libnccl.so"
  echo "$lib"
}

# cuDNN's headers (those of 9.13: the attention asks libcudnn.so.9 for nothing newer) and the cuDNN frontend's
# (header-only C++, 1.32), which kernels/cuda/attention_cudnn.cpp compiles against, from their wheels: only the
# headers are kept, as the library is loaded at run time from the GPU machine's cuDNN. Prints their folder.
cudnn_headers() {
  local include=$prefix/cudnn/include
  if [ ! -e "$include/cudnn.h" ] || [ ! -e "$include/cudnn_frontend.h" ]; then
    log "installing the headers of nvidia-cudnn-cu13==9.13.0.50 and nvidia-cudnn-frontend==1.32.0 into $include"
    local wheels
    wheels=$(mktemp -d "${TMPDIR:-/tmp}/nanogpt-cudnn.XXXXXX")
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$wheels" \
      'nvidia-cudnn-cu13==9.13.0.50' 'nvidia-cudnn-frontend==1.32.0' >&2
    mkdir -p "$include"
    python3 - "$include" "$wheels"/*.whl <<'PY'
import pathlib, sys, zipfile
include = pathlib.Path(sys.argv[1])
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            for folder in ("nvidia/cudnn/include/", "include/"):
                if name.startswith(folder) and not name.endswith("/"):
                    target = include / name[len(folder):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
PY
    rm -rf "$wheels"
  fi
  echo "$include"
}

if [ "${1:-}" = --cudnn-headers ]; then
  echo "export NANOGPT_CUDNN_INCLUDE=$(cudnn_headers)"
  exit 0
fi

if command -v nvcc >/dev/null 2>&1 && [ -z "${FORCE_WHEELS:-}" ]; then
  nvcc_dir=$(dirname "$(command -v nvcc)")
  cuda_root=$(cd "$nvcc_dir/.." && pwd)
  log "using the toolkit of $(command -v nvcc)"
  echo "export CUDA_ROOT=$cuda_root"
  echo "export NANOGPT_CUDNN_INCLUDE=$(cudnn_headers)"
  if [ -n "$with_nccl" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
    echo "export LIBRARY_PATH=$(nccl_wheel)\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  fi
  exit 0
fi

# CUDA 13.0 (what the GPU machines' driver runs); cuRAND numbers its releases on its own (10.4.0 is 13.0's).
packages=(nvidia-cuda-nvcc==13.0.* nvidia-cuda-runtime==13.0.* nvidia-cuda-cccl==13.0.* nvidia-cuda-crt==13.0.*
  nvidia-nvvm==13.0.* nvidia-cublas==13.0.* nvidia-curand==10.4.0.* nvidia-cuda-nvrtc==13.0.*)
site=$prefix/site
cuda_root=$prefix/root
if [ -x "$site/nvidia/cu13/bin/nvcc" ]; then
  log "wheels already in $site"
else
  log "installing ${packages[*]} into $site"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$site" "${packages[@]}" >&2
fi

# One toolkit-shaped folder, as nvcc and cudarc's build expect: bin/ include/ lib64/ nvvm/.
wheel=$site/nvidia/cu13
mkdir -p "$cuda_root"
for dir in bin include nvvm; do
  [ -e "$cuda_root/$dir" ] || ln -s "$wheel/$dir" "$cuda_root/$dir"
done
mkdir -p "$cuda_root/lib64"
for lib in "$wheel"/lib/*.so*; do
  ln -sf "$lib" "$cuda_root/lib64/$(basename "$lib")"
done
if [ -n "$with_nccl" ]; then
  nccl_lib=$(nccl_wheel)
  ln -sf "$nccl_lib/libnccl.so.2" "$cuda_root/lib64/libnccl.so.2"
  ln -sf libnccl.so.2 "$cuda_root/lib64/libnccl.so"
fi
# The linker looks for the unversioned names (-lcublas); the wheels ship only the sonames.
for lib in cublas cublasLt curand nvrtc cudart; do
  if [ ! -e "$cuda_root/lib64/lib$lib.so" ]; then
    soname=$(cd "$cuda_root/lib64" && ls "lib$lib.so."* 2>/dev/null | sort | head -n1 || true)
    [ -n "$soname" ] && ln -s "$soname" "$cuda_root/lib64/lib$lib.so"
  fi
done
# nvcc runs its own bin/ tools (ptxas, fatbinary, cicc under nvvm/bin); the wheels do not set them executable.
chmod +x "$wheel"/bin/* "$wheel"/nvvm/bin/* 2>/dev/null || true

# libcuda.so.1 stand-in: every cu* function that cudarc declares, each returning CUDA_ERROR_STUB_LIBRARY (34),
# so that a build linked against it fails cleanly if it is ever loaded instead of the driver's library. It must
# define the symbols: rustc links with --as-needed, which would drop an empty library, and the addon would then
# miss libcuda at run time. Only the link uses it (it is in lib64/stubs, never on LD_LIBRARY_PATH).
stubs=$cuda_root/lib64/stubs
if [ ! -e "$stubs/libcuda.so" ]; then
  registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -n1 || true)
  if [ -z "$registry" ]; then
    log "fetching crates to read cudarc's driver bindings"
    cargo fetch --manifest-path "$root/Cargo.toml" >&2
    registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -n1)
  fi
  mkdir -p "$stubs"
  grep -oE '^ +fn cu[A-Za-z0-9_]+\(' "$registry/src/driver/sys/mod.rs" | sed -E 's/^ +fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$stubs/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda-stub.c"
  log "wrote $stubs/libcuda.so ($(wc -l < "$stubs/libcuda-stub.c") symbols from $(basename "$registry"))"
fi

"$cuda_root/bin/nvcc" --version | tail -n 2 | head -n 1 | sed 's/^/setup-cuda: nvcc: /' >&2
echo "export CUDA_ROOT=$cuda_root"
echo "export NANOGPT_CUDNN_INCLUDE=$(cudnn_headers)"
echo "export PATH=$cuda_root/bin:\$PATH"
echo "export LIBRARY_PATH=$cuda_root/lib64:$stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
echo "export LD_LIBRARY_PATH=$cuda_root/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
