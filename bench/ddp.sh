#!/usr/bin/env bash
# Data-parallel scaling on this machine: the README CPU recipe's model (4 layers, 4 heads, 128 wide, batch 12 x 64)
# with a global batch of 2 micro-batches per step, trained by one process (both micro-batches on it) and by two ranks
# under mpirun (`--nproc_per_node=2`, one micro-batch each), with the engine's threads per process as given.
# Prints the whole job's tokens/s (median over the logged steps after the first 5) for each.
#
# Usage: bash bench/ddp.sh [--iters=N]   (default 40). Needs OpenMPI and `npm run build:native:mpi`.
set -euo pipefail
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
iters=40
for arg in "$@"; do
  case "$arg" in
    --iters=*) iters=${arg#--iters=} ;;
    *) echo "error: unknown argument '$arg'; usage: bash bench/ddp.sh [--iters=N]" >&2; exit 1 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
node "$root/bin/nanogpt-rs.js" prepare shakespeare_char >/dev/null

recipe=(configs/train_shakespeare_char.ts --device=cpu --engine=native --block_size=64 --batch_size=12 --n_layer=4
  --n_head=4 --n_embd=128 --dropout=0.0 --gradient_accumulation_steps=2 --max_iters="$iters" --eval_interval=100000
  --eval_iters=1 --log_interval=1)

# The median tokens/s of the steps after the first 5 in out_dir/log.jsonl.
tokens_per_s() {
  node -e '
    const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
    const rates = lines.filter((r) => r.kind === "train" && r.iter >= 5).map((r) => r.tokens_per_s).sort((a, b) => a - b);
    console.log(Math.round(rates[Math.floor(rates.length / 2)]));' "$1/log.jsonl"
}

run() {
  local label=$1 threads=$2 out=$3
  shift 3
  RAYON_NUM_THREADS=$threads node "$root/bin/nanogpt-rs.js" train "$root/${recipe[0]}" "${recipe[@]:1}" --out_dir="$out" "$@" >/dev/null
  printf '%-40s %8s tokens/s\n' "$label" "$(tokens_per_s "$out")"
}

echo "$(nproc) cores, $iters iterations of 2 x 12 x 64 tokens"
run "1 process, $(nproc) threads" "$(nproc)" out-1
run "2 ranks, $(nproc) threads each" "$(nproc)" out-2 --nproc_per_node=2
run "2 ranks, 1 thread each" 1 out-2x1 --nproc_per_node=2
