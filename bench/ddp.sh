#!/usr/bin/env bash
# Data-parallel scaling on this machine: the README CPU recipe's model (4 layers, 4 heads, 128 wide, batch 12 x 64)
# with a global batch of 2 micro-batches per step, trained by one process (both micro-batches on it) and by two ranks
# under mpirun (`--nproc_per_node=2`, one micro-batch each): with their default share of the cores each, and with
# every rank using all of them. The three runs take turns, `--rounds` times, so that other load on the machine falls on
# all of them alike. Prints the whole job's tokens/s of each run (the median over its logged steps after the first 5)
# and the median over the rounds.
#
# Usage: bash bench/ddp.sh [--iters=N] [--rounds=N]   (default 40 and 3). Needs OpenMPI and `npm run build:native:mpi`.
set -euo pipefail
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
iters=40
rounds=3
for arg in "$@"; do
  case "$arg" in
    --iters=*) iters=${arg#--iters=} ;;
    --rounds=*) rounds=${arg#--rounds=} ;;
    *) echo "error: unknown argument '$arg'; usage: bash bench/ddp.sh [--iters=N] [--rounds=N]" >&2; exit 1 ;;
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

# Trains with the extra arguments (and environment) given, and appends its tokens/s to results/$1.
run() {
  local name=$1
  shift
  rm -rf "out-$name"
  node "$root/bin/nanogpt-rs.js" train "$root/${recipe[0]}" "${recipe[@]:1}" --out_dir="out-$name" "$@" >/dev/null
  tokens_per_s "out-$name" >>"results/$name"
}

cores=$(nproc)
mkdir -p results
for ((round = 1; round <= rounds; round++)); do
  run one
  run ranks --nproc_per_node=2
  RAYON_NUM_THREADS=$cores run ranks-all --nproc_per_node=2
done

report() {
  printf '%-48s %8s tokens/s   (rounds: %s)\n' "$2" "$(sort -n "results/$1" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')" "$(paste -sd ' ' "results/$1")"
}
echo "$cores cores, $iters iterations of 2 x 12 x 64 tokens, median of $rounds rounds"
report one "1 process, $cores threads"
report ranks "2 ranks, $((cores / 2 > 1 ? cores / 2 : 1)) thread(s) each (the default)"
report ranks-all "2 ranks, $cores threads each (RAYON_NUM_THREADS)"
