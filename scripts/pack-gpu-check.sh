#!/usr/bin/env bash
# Builds here everything bench/gpu-check.sh needs on a GPU machine that has no Node.js and no Rust, into one
# archive, .gpu-check/payload.tar.xz (carry the .gpu-check folder with the working tree):
#   app/native/cuda/nanogpt.linux-x64-gnu.node  the CUDA addon (scripts/build-cuda.sh)
#   app/tests/cuda                          the CUDA-vs-CPU correctness test (crates/nanogpt-core/tests/cuda.rs)
#   app/tests/cuda_kernels                  the CUDA kernels' tests (crates/nanogpt-core/tests/cuda_kernels), run on
#                                           the device with NANOGPT_TEST_DEVICE=cuda
#   app/bench/cuda_kernels_bench            the kernels' timings (crates/nanogpt-core/examples/cuda_kernels_bench.rs)
#   app/bench/cuda_step_bench               the fused CUDA step's timing (crates/nanogpt-core/examples/cuda_step_bench.rs)
#   app/tests/nccl                          the one-rank NCCL run against one without (crates/nanogpt-core/tests/nccl.rs)
#   app/dist/cli.mjs                        the CLI (train, bench, prepare), bundled into one file
#   app/configs/*.mjs                       the config files, as JavaScript (the bundle has no TypeScript loader)
#   app/bench/sample.mjs, torch_ref.py      the sampling benchmark (bench/sample.ts), bundled, and its reference
#   node/bin/node                           this machine's Node.js runtime
#   app/COMMIT                              the commit it was built from (`git describe --always --dirty`), which
#                                           bench/gpu-check.sh prints, so that a stale payload shows in the log
# Needs: cargo, node_modules (npm ci), and the CUDA toolkit that scripts/build-cuda.sh sets up.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
out=$root/.gpu-check
stage=$(mktemp -d "${TMPDIR:-/tmp}/nanogpt-gpu-check.XXXXXX")
trap 'rm -rf "$stage"' EXIT
log() { echo "pack-gpu-check: $*" >&2; }

bash scripts/build-cuda.sh
eval "$(bash scripts/setup-cuda.sh --with-nccl 2>/dev/null)"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} RUSTFLAGS="-C target-cpu=x86-64-v3" CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
# test_binary FEATURE NAME: builds the test crates/nanogpt-core/tests/NAME.rs with FEATURE and prints its path.
test_binary() {
  local bin
  bin=$(cargo test --release -p nanogpt-core --features "$1" --test "$2" --no-run --message-format=json \
    | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{for(const l of s.split("\n")){try{const m=JSON.parse(l);if(m.reason==="compiler-artifact"&&m.target.name===process.argv[1]&&m.executable)console.log(m.executable)}catch{}}})' "$2")
  [ -x "$bin" ] || { log "no test binary found for tests/$2.rs"; exit 1; }
  echo "$bin"
}
test_bin=$(test_binary cuda cuda)
kernels_test_bin=$(test_binary cuda cuda_kernels)
nccl_test_bin=$(test_binary nccl nccl)
cargo build --release -p nanogpt-core --features cuda --example cuda_kernels_bench --example cuda_step_bench

app=$stage/app
mkdir -p "$app/native/cuda" "$app/tests" "$app/dist" "$app/configs" "$app/bench" "$app/node_modules/tsx"
cp native/cuda/nanogpt.linux-x64-gnu.node "$app/native/cuda/"
cp "$test_bin" "$app/tests/cuda"
cp "$kernels_test_bin" "$app/tests/cuda_kernels"
cp "$nccl_test_bin" "$app/tests/nccl"
cp "$CARGO_TARGET_DIR/release/examples/cuda_kernels_bench" "$CARGO_TARGET_DIR/release/examples/cuda_step_bench" "$app/bench/"
cp package.json "$app/"
git describe --always --dirty > "$app/COMMIT"
# The corpus module resolves tsx's location when it loads (for its worker threads); shakespeare_char needs no worker.
cp node_modules/tsx/package.json "$app/node_modules/tsx/"
esbuild=node_modules/.bin/esbuild
# commander is CommonJS: the ESM bundle gets a require() for it.
banner="import { createRequire as __createRequire } from 'node:module'; const require = __createRequire(import.meta.url);"
"$esbuild" ts/cli.ts --bundle --platform=node --format=esm --target=node20 --log-level=warning \
  --banner:js="$banner" --outfile="$app/dist/cli.mjs"
"$esbuild" bench/sample.ts --bundle --platform=node --format=esm --target=node20 --log-level=warning \
  --banner:js="$banner" --outfile="$app/bench/sample.mjs"
cp bench/torch_ref.py "$app/bench/"
for config in configs/*.ts; do
  "$esbuild" "$config" --format=esm --target=node20 --log-level=warning --outfile="$app/configs/$(basename "$config" .ts).mjs"
done

node_dir=$stage/node
mkdir -p "$node_dir/bin"
cp "$(command -v node)" "$node_dir/bin/node"

mkdir -p "$out"
log "compressing (xz)"
tar -C "$stage" -cf - app node | xz -T0 -6 > "$out/payload.tar.xz.tmp"
mv "$out/payload.tar.xz.tmp" "$out/payload.tar.xz"
size=$(stat -c %s "$out/payload.tar.xz")
log "wrote .gpu-check/payload.tar.xz ($((size / 1048576)) MiB; the carry limit is 64 MiB with the working tree's own files)"
if (( size > 60 * 1048576 )); then log "warning: over 60 MiB"; exit 1; fi
