#!/usr/bin/env bash
# How the CPU engines scale from 1 thread to all cores: `nanogpt-rs bench` (bench.py's timed training steps) at the
# README CPU recipe's shape (4 layers, 4 heads, 128 wide, batch 12 x 64, vocab 65, float32) with
# NANOGPT_WASM_THREADS (WebAssembly) or RAYON_NUM_THREADS (native) set to 1 and to the core count, the two runs
# taking turns `--rounds` times so that other load on the machine falls on both alike. Prints each run's ms/iter, the
# medians and the speed-up.
#
# Usage: bash bench/threads.sh [--engines=wasm,native] [--rounds=N] [--iters=N]   (default both engines, 5 rounds, 40 steps)
set -euo pipefail
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
engines=wasm,native
rounds=5
iters=40
for arg in "$@"; do
  case "$arg" in
    --engines=*) engines=${arg#--engines=} ;;
    --rounds=*) rounds=${arg#--rounds=} ;;
    --iters=*) iters=${arg#--iters=} ;;
    *) echo "error: unknown argument '$arg'; usage: bash bench/threads.sh [--engines=wasm,native] [--rounds=N] [--iters=N]" >&2; exit 2 ;;
  esac
done
for value in "$rounds" "$iters"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "error: --rounds and --iters take a positive integer, got '$value'" >&2; exit 2; }
done

cores=$(nproc)
shape=(--device=cpu --dtype=float32 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --vocab_size=65
  --warmup=10 --iters="$iters")

# ms/iter of one bench run of engine $1 on $2 threads.
ms_per_iter() {
  local variable=RAYON_NUM_THREADS
  [ "$1" = wasm ] && variable=NANOGPT_WASM_THREADS
  env "$variable=$2" node bin/nanogpt-rs.js bench "${shape[@]}" --engine="$1" | sed -n 's/^RESULT //p' |
    node -e 'process.stdin.on("data", (d) => console.log(JSON.parse(d).ms_per_iter))'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "README CPU recipe shape, $iters timed steps per run, $rounds rounds, 1 thread against $cores"
for engine in ${engines//,/ }; do
  one=() all=()
  for ((round = 1; round <= rounds; round++)); do
    one+=("$(ms_per_iter "$engine" 1)")
    all+=("$(ms_per_iter "$engine" "$cores")")
  done
  median_one=$(printf '%s\n' "${one[@]}" | median)
  median_all=$(printf '%s\n' "${all[@]}" | median)
  printf '%-7s 1 thread:  %8s ms/iter median   (rounds: %s)\n' "$engine" "$median_one" "${one[*]}"
  printf '%-7s %s threads: %8s ms/iter median   (rounds: %s)\n' "$engine" "$cores" "$median_all" "${all[*]}"
  printf '%-7s speed-up of %s threads over 1: %sx\n' "$engine" "$cores" "$(awk -v a="$median_one" -v b="$median_all" 'BEGIN { printf "%.2f", a / b }')"
done
