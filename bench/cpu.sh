#!/usr/bin/env bash
# nanoGPT's README CPU recipe, run with this engine and with the PyTorch reference (bench/torch_ref.py)
# on the same machine, one after the other: the WebAssembly engine, the native (napi) engine and PyTorch. Prints each
# training wall time, its ratio to PyTorch's and each val loss.
#
# Then times single training steps (ms/iter, native engine and PyTorch, like bench.py) at two larger shapes: the
# GPU shakespeare_char model (6 layers, 6 heads, 384 wide, T=256, vocab 65) at batch 8, and GPT-2 124M
# (12/12/768, vocab 50304) at batch 1 x T=256.
#
# Usage: bash bench/cpu.sh [--iters=N] [--engines=wasm,native] [--shapes=0]
#   --iters=N         (or MAX_ITERS=N) default 2000, the recipe's length
#   --engines=LIST    engine builds to time, in order (default: wasm,native)
#   --shapes=0        skip the larger shapes
#   KEEP=1            keep the checkpoint directory as well as the logs
#
# Both sides time the training loop (evaluations included) and leave out start-up: torch_ref.py reports the time
# from just before its loop; ours is measured from the last line printed before the loop (the optimizer groups)
# to the end of the output. The whole process time of ours is printed too.
set -euo pipefail
export LC_ALL=C  # "." as the decimal point in $EPOCHREALTIME and awk

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

iters=${MAX_ITERS:-2000}
engine_list=wasm,native
shapes=1
for arg in "$@"; do
  case "$arg" in
    --iters=*) iters=${arg#--iters=} ;;
    --engines=*) engine_list=${arg#--engines=} ;;
    --shapes=*) shapes=${arg#--shapes=} ;;
    -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$arg'; usage: bash bench/cpu.sh [--iters=N] [--engines=wasm,native] [--shapes=0]" >&2; exit 2 ;;
  esac
done
if ! [[ "$iters" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --iters expects a positive integer, got '$iters'" >&2
  exit 2
fi
# The recipe evaluates every 250 iterations; a shorter run that is not a multiple of 250 evaluates at 0 and N only,
# so that both sides always report the val loss at the last iteration.
eval_interval=250
if (( iters % 250 != 0 )); then eval_interval=$iters; fi
IFS=, read -r -a engines <<< "$engine_list"
for engine in "${engines[@]}"; do
  case "$engine" in
    wasm | native) ;;
    *) echo "error: --engines takes wasm and/or native, got '$engine'" >&2; exit 2 ;;
  esac
done

torch_ref=$root/bench/torch_ref.py
text=$root/data/shakespeare_char/input.txt

# The same model and recipe on both sides.
shape=(--eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
  --max_iters="$iters" --lr_decay_iters="$iters" --dropout=0.0 --eval_interval="$eval_interval")

work=$(mktemp -d "${TMPDIR:-/tmp}/nanogpt-bench-cpu.XXXXXX")
out_dir=$work/out
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$out_dir"-*; fi; }
trap cleanup EXIT

section() { printf '\n==== %s ====\n' "$*"; }
# Timings only compare when nothing else competes for the cores (PyTorch's threads suffer most from sharing). The
# cores' busy fraction over two seconds right before a run tells (the load average would still count the run before).
busy=''
check_load() {
  local before after
  before=$(awk '/^cpu / { print $2 + $3 + $4 + $6 + $7 + $8, $5 }' /proc/stat 2>/dev/null || echo '0 0')
  sleep 2
  after=$(awk '/^cpu / { print $2 + $3 + $4 + $6 + $7 + $8, $5 }' /proc/stat 2>/dev/null || echo '0 0')
  local used
  used=$(awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " "); t = (y[1] - x[1]) + (y[2] - x[2]);
    printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }')
  echo "cores busy: ${used}% (over the 2 s before this run)"
  if (( used > 20 )); then busy="$busy $1 (${used}% busy)"; fi
}

section "machine"
echo "cpu:   $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || echo '?'), $(nproc) cores"
echo "node:  $(node --version)"
echo "iters: $iters (eval every $eval_interval, eval_iters=20)"
echo "logs:  $work"

for engine in "${engines[@]}"; do
  if [ "$engine" = native ] && ! ls native/*.node >/dev/null 2>&1; then
    echo "error: the native engine is not built (no native/*.node); run \`npm install\` (or \`npm run build:native\`) first" >&2
    exit 1
  fi
  if [ "$engine" = wasm ] && [ ! -f wasm/nanogpt_bg.wasm ]; then
    echo "error: the WebAssembly engine is not built (no wasm/nanogpt_bg.wasm); run \`npm install\` (or \`npm run build:wasm\`) first" >&2
    exit 1
  fi
done

# ---------------------------------------------------------------- reference (PyTorch), baseline first
ref_ok=0
ref_wall='' ref_val='' ref_why=''
section "reference: torch_ref.py (PyTorch)"
if [ ! -f "$torch_ref" ]; then
  ref_why="$torch_ref not found"
elif ! command -v python3 >/dev/null 2>&1; then
  ref_why="python3 is not installed"
elif ! python3 -c 'import torch, numpy' >/dev/null 2>&1; then
  ref_why="python3 cannot import torch (and numpy); pip install torch numpy"
else
  check_load reference
  echo "torch: $(python3 -c 'import torch; print(torch.__version__, "threads:", torch.get_num_threads())' 2>/dev/null)"
  ref_cmd=(python3 "$torch_ref" train --text="$text" --device=cpu --compile=0 "${shape[@]}")
  echo "\$ ${ref_cmd[*]}"
  set +e
  "${ref_cmd[@]}" 2>&1 | tee "$work/torch_ref.log" | grep --line-buffered -E '^step '
  ref_status=${PIPESTATUS[0]}
  set -e
  if [ "$ref_status" = 0 ]; then
    parsed=$(python3 - "$work/torch_ref.log" <<'PY'
import json, sys
line = [l for l in open(sys.argv[1], encoding="utf-8") if l.startswith("RESULT ")][-1]
res = json.loads(line[len("RESULT "):])
it, _train, val, _t = res["history"][-1]
print(res["wall_s"], f"{val:.4f}", it)
PY
    ) || parsed=''
    read -r ref_wall ref_val ref_last <<< "$parsed" || true
    if [ -z "$parsed" ]; then
      ref_why="no RESULT line in $work/torch_ref.log"
    elif [ "$ref_last" != "$iters" ]; then
      ref_why="its last evaluation is at iteration $ref_last, not $iters"
    else
      ref_ok=1
    fi
  else
    tail -n 20 "$work/torch_ref.log" >&2
    ref_why="torch_ref.py failed (log: $work/torch_ref.log)"
  fi
fi
[ "$ref_ok" = 1 ] || echo "reference skipped: $ref_why"

# ---------------------------------------------------------------- ours, with each engine build
if [ ! -f data/shakespeare_char/train.bin ] || [ ! -f data/shakespeare_char/val.bin ] || [ ! -f data/shakespeare_char/meta.json ]; then
  node bin/nanogpt-rs.js prepare shakespeare_char
fi
declare -A wall process val
run_ours() {
  local engine=$1 log=$work/ours-$1.log
  section "ours: nanogpt-rs, $engine engine"
  local cmd=(node bin/nanogpt-rs.js train configs/train_shakespeare_char.ts --device=cpu --engine="$engine" --compile=False
    --log_interval=1 "${shape[@]}" --out_dir="$out_dir-$engine")
  check_load "ours ($engine)"
  echo "\$ ${cmd[*]}"
  # Each output line is stamped with the time it arrived; the loop starts right after the optimizer-groups line.
  local start_ns end_ns status
  start_ns=$(date +%s%N)
  set +e
  exec 3>&1
  "${cmd[@]}" 2>&1 | while IFS= read -r line; do
    printf '%s %s\n' "$EPOCHREALTIME" "$line"
    if [[ "$line" == "step "* ]]; then printf '%s\n' "$line" >&3; fi
  done > "$log"
  status=${PIPESTATUS[0]}
  exec 3>&-
  set -e
  end_ns=$(date +%s%N)
  if [ "$status" != 0 ]; then
    cut -d' ' -f2- "$log" | tail -n 20 >&2
    echo "error: nanogpt-rs train with the $engine engine failed (exit $status; log: $log)" >&2
    exit 1
  fi
  process[$engine]=$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  wall[$engine]=$(awk '
    / num non-decayed parameter tensors/ { t0 = $1 }
    { last = $1 }
    END { if (t0 == "") exit 1; printf "%.1f", last - t0 }' "$log") || {
    echo "error: could not find the start of the training loop in $log" >&2
    exit 1
  }
  val[$engine]=$(cut -d' ' -f2- "$log" | sed -n "s/^step $iters: train loss [0-9.]*, val loss \([0-9.]*\)$/\1/p" | tail -n 1)
  if [ -z "${val[$engine]}" ]; then
    echo "error: no 'step $iters: ... val loss' line in $log" >&2
    exit 1
  fi
}
for engine in "${engines[@]}"; do run_ours "$engine"; done

# ---------------------------------------------------------------- summary
section "summary: README CPU recipe, $iters iterations, $(nproc) cores"
printf '%-26s %18s %18s %20s\n' "" "training wall (s)" "ratio to torch" "val loss @ $iters"
for engine in "${engines[@]}"; do
  ratio='n/a'
  if [ "$ref_ok" = 1 ]; then ratio=$(awk -v a="${wall[$engine]}" -v b="$ref_wall" 'BEGIN { printf "%.2f", a / b }'); fi
  printf '%-26s %18s %18s %20s\n' "nanogpt-rs, $engine engine" "${wall[$engine]}" "$ratio" "${val[$engine]}"
done
if [ "$ref_ok" = 1 ]; then
  printf '%-26s %18s %18s %20s\n' "torch_ref.py (PyTorch)" "$ref_wall" "1.00" "$ref_val"
else
  echo "torch_ref.py (PyTorch): not run: $ref_why"
fi
echo
for engine in "${engines[@]}"; do
  echo "nanogpt-rs, $engine engine, as a whole process (start-up included): ${process[$engine]} s"
done
echo "training wall = the training loop with its evaluations, start-up excluded."
echo "eval_iters=20 makes each val loss noisy (about +-0.03)."

# ---------------------------------------------------------------- larger shapes, one training step at a time
# name, then the shape flags both benches take.
step_shapes=(
  "shakespeare_char GPU model, B=8 x T=256|--n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --vocab_size=65 --batch_size=8"
  "GPT-2 124M, B=1 x T=256|--n_layer=12 --n_head=12 --n_embd=768 --block_size=256 --vocab_size=50304 --batch_size=1"
)
# The ms_per_iter of the last RESULT line of a log.
ms_per_iter() {
  node -e 'const l = require("fs").readFileSync(process.argv[1], "utf8").split("\n").filter((l) => l.startsWith("RESULT ")).pop();
    if (!l) process.exit(1); console.log(JSON.parse(l.slice(7)).ms_per_iter)' "$1"
}
declare -a shape_rows=()
if [ "$shapes" != 0 ]; then
  section "training step at larger shapes (native engine vs PyTorch, 3 burn-in + 10 timed steps)"
  for entry in "${step_shapes[@]}"; do
    name=${entry%%|*}
    read -r -a flags <<< "${entry#*|}"
    echo "-- $name"
    ours_ms='n/a' torch_ms='n/a'
    check_load "$name (ours)"
    log=$work/step-ours-${#shape_rows[@]}.log
    if node bin/nanogpt-rs.js bench --device=cpu --engine=native --dtype=float32 --warmup=3 --iters=10 "${flags[@]}" > "$log" 2>&1; then
      ours_ms=$(ms_per_iter "$log") || ours_ms='n/a'
    else
      tail -n 5 "$log" >&2
    fi
    if [ "$ref_ok" = 1 ] || python3 -c 'import torch, numpy' >/dev/null 2>&1; then
      check_load "$name (torch)"
      log=$work/step-torch-${#shape_rows[@]}.log
      if python3 "$torch_ref" bench --device=cpu --compile=0 --warmup=3 --iters=10 "${flags[@]}" > "$log" 2>&1; then
        torch_ms=$(ms_per_iter "$log") || torch_ms='n/a'
      else
        tail -n 5 "$log" >&2
      fi
    fi
    ratio='n/a'
    if [ "$ours_ms" != n/a ] && [ "$torch_ms" != n/a ]; then ratio=$(awk -v a="$ours_ms" -v b="$torch_ms" 'BEGIN { printf "%.2f", a / b }'); fi
    shape_rows+=("$(printf '%-42s %14s %14s %14s' "$name" "$ours_ms" "$torch_ms" "$ratio")")
  done
  echo
  printf '%-42s %14s %14s %14s\n' "" "ours ms/iter" "torch ms/iter" "ratio"
  for row in "${shape_rows[@]}"; do echo "$row"; done
fi
if [ -n "$busy" ]; then
  echo "warning: other processes were using the CPU before:$busy; the times (and the ratios) are unreliable, rerun on an idle machine"
fi
