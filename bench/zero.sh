#!/usr/bin/env bash
# ZeRO stage 1's memory: the peak resident memory (VmHWM) of each rank of a 2-rank CPU run under mpirun, with the AdamW
# state whole on every rank (zero_stage=0) and sharded over the two (zero_stage=1). The model is GPT-2 124M's body
# (12 layers, 12 heads, 768 wide) on shakespeare_char's 65-token vocabulary, trained for a few steps of 2 x 1 x 64
# tokens, without checkpoints. Prints each rank's peak, the saving, the whole AdamW state's size (8 bytes per
# parameter) for comparison, and each run's tokens/s.
#
# Usage: bash bench/zero.sh [--iters=N] [--n_layer=N] [--n_embd=N]   (default 3, 12, 768). Needs OpenMPI and
# `npm run build:native:mpi`.
set -euo pipefail
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
iters=3
n_layer=12
n_embd=768
for arg in "$@"; do
  case "$arg" in
    --iters=*) iters=${arg#--iters=} ;;
    --n_layer=*) n_layer=${arg#--n_layer=} ;;
    --n_embd=*) n_embd=${arg#--n_embd=} ;;
    *) echo "error: unknown argument '$arg'; usage: bash bench/zero.sh [--iters=N] [--n_layer=N] [--n_embd=N]" >&2; exit 1 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
node "$root/bin/nanogpt-rs.js" prepare shakespeare_char >/dev/null

recipe=(configs/train_shakespeare_char.ts --device=cpu --engine=native --n_layer="$n_layer" --n_head=12 --n_embd="$n_embd"
  --block_size=64 --batch_size=1 --dropout=0.0 --gradient_accumulation_steps=2 --max_iters="$iters" --eval_interval=100000
  --eval_iters=1 --log_interval=1 --nproc_per_node=2)

# The median tokens/s of the logged steps after the first.
tokens_per_s() {
  node -e '
    const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
    const rates = lines.filter((r) => r.kind === "train" && r.iter >= 1).map((r) => r.tokens_per_s).sort((a, b) => a - b);
    console.log(Math.round(rates[Math.floor(rates.length / 2)]));' "$1/log.jsonl"
}

mib() {
  echo $(($(cat "$1") / 1024))
}

for stage in 0 1; do
  mkdir -p "peak-$stage"
  PEAK_MEMORY_DIR="$work/peak-$stage" NODE_OPTIONS="--require $root/bench/peak-memory.cjs" \
    node "$root/bin/nanogpt-rs.js" train "$root/${recipe[0]}" "${recipe[@]:1}" --zero_stage="$stage" --out_dir="out-$stage" >"train-$stage.log"
done

params=$(grep -o 'number of parameters: [0-9.]*M' train-0.log | grep -o '[0-9.]*')
echo "2 ranks, ${n_layer} layers x ${n_embd} wide (${params}M parameters; whole AdamW state: $(awk -v p="$params" 'BEGIN { printf "%.0f", p * 8e6 / 1048576 }') MiB), $iters steps"
printf '%-28s %14s %14s %12s\n' run 'rank 0 (MiB)' 'rank 1 (MiB)' tokens/s
for stage in 0 1; do
  printf '%-28s %14s %14s %12s\n' "zero_stage=$stage" "$(mib "peak-$stage/rank-0")" "$(mib "peak-$stage/rank-1")" "$(tokens_per_s "out-$stage")"
done
for rank in 0 1; do
  echo "rank $rank: ZeRO-1 saves $(($(mib "peak-0/rank-$rank") - $(mib "peak-1/rank-$rank"))) MiB of its peak"
done
