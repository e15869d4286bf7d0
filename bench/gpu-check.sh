#!/usr/bin/env bash
# The CUDA engine on a GPU machine, against the CPU engine and against PyTorch (bench/torch_ref.py):
#   1. correctness: logits, loss and gradients of a small model on CUDA vs CPU (float32/TF32 and bfloat16),
#      and a few training steps in float32, bfloat16 and float16; the engine's CUDA kernels (kernels/cuda) against
#      the CPU kernels they mirror, on the device (crates/nanogpt-core/tests/cuda_kernels), and the fused step's
#      tests again with cuDNN's attention (NANOGPT_CUDA_ATTENTION=cudnn); each kernel timed alone
#      at GPT-2 124M shapes in bfloat16 (examples/cuda_kernels_bench.rs), then PyTorch's counterparts
#      (torch_ref.py kernels); then a run of one rank over NCCL (rendezvous on localhost) against the same run
#      without it (crates/nanogpt-core/tests/nccl.rs);
#   2. throughput at GPT-2 124M shapes (B=12, T=1024, bfloat16): torch_ref.py bench, then the fused CUDA step
#      alone (examples/cuda_step_bench.rs: train_step_cuda.rs on the kernels above, then 3 more steps with every
#      kernel and product timed by CUDA events, for the table of device time per kernel; again with the attention
#      kernels at 16 rows a warp, NANOGPT_CUDA_ATTENTION_WARP_ROWS=16, and with cuDNN's attention,
#      NANOGPT_CUDA_ATTENTION=cudnn), then ours through the CLI (the engine's default, the fused step), then through
#      candle's graph (NANOGPT_CUDA_STEP=graph);
#   3. per-phase profile of our step (data, forward, backward, optimizer), at 124M and shakespeare_char shapes (the
#      latter again with the attention kernels at 16 rows a warp);
#   4. sampling from a GPT-2 XL-shaped model (bench/sample.ts): torch_ref.py sample, then ours; tokens/s of each;
#   5. the shakespeare_char recipe: torch_ref.py train, then our train (the fused step); best val loss and wall time
#      of each;
#   6. the tensor-core attention kernels under Nsight Compute (ncu), where the machine lets it read the counters.
# It builds nothing: run `bash scripts/pack-gpu-check.sh` first and carry .gpu-check with the working tree. The
# machine needs python3 with torch, the NVIDIA driver, and CUDA 13 libraries (cuBLAS, cuRAND, NVRTC; NCCL for the nccl
# phase; cuDNN 9 for cuDNN's attention, which torch's wheels bring).
#
# Usage: bash bench/gpu-check.sh      (from the repository root; logs under $OUT, default .gpu-check/out)
#   TRAIN_ITERS=N   length of the shakespeare_char runs on both sides (default 2000; the recipe's is 5000)
#   BUDGET_S=N      stop starting phases after this many seconds (default 540)
#   PHASES="a b"    run only these phases (names as in the summary; unpack always runs), e.g. to spread the check
#                   over two calls: PHASES="correctness kernels torch_bench step_bench" first
# Each phase runs under `timeout`; a failed phase is logged and the next one runs. The last lines are tables: the
# kernels' times (ours, PyTorch's, and their ratio), then the whole runs'.
set -uo pipefail
export LC_ALL=C

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
out=${OUT:-$root/.gpu-check/out}
mkdir -p "$out"
exec > >(tee -a "$out/gpu-check.log") 2>&1

start=$SECONDS
budget=${BUDGET_S:-540}
train_iters=${TRAIN_ITERS:-2000}
work=$(mktemp -d "${TMPDIR:-/tmp}/nanogpt-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
app=$work/app
node=$work/node/bin/node
addon=$app/native/cuda/nanogpt.linux-x64-gnu.node

# The driver's libcuda, the toolkit's cuBLAS/NVRTC, and cuRAND, NCCL and cuDNN from the torch wheels, wherever this
# machine has them.
torch_nvidia=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
for dir in /usr/local/nvidia/lib64 /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64 \
  "$torch_nvidia/cu13/lib" "$torch_nvidia/nccl/lib" "$torch_nvidia/cudnn/lib"; do
  [ -d "$dir" ] && LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export LD_LIBRARY_PATH

declare -A status
section() { printf '\n==== %s (t=%ds) ====\n' "$*" $((SECONDS - start)); }
# phase NAME LIMIT_S COMMAND...: runs COMMAND under timeout (capped by what is left of the budget), output to
# $out/NAME.log and to this log; records ok / failed (rc) / timeout / skipped.
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  section "$name"
  if [ -n "${PHASES:-}" ] && [ "$name" != unpack ] && [[ " $PHASES " != *" $name "* ]]; then
    echo "skipped: not in PHASES"
    status[$name]="skipped (PHASES)"
    return 1
  fi
  if ((left < 20)); then
    echo "skipped: the time budget is spent"
    status[$name]=skipped
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "\$ $*   (timeout ${limit}s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > >(tee "$out/$name.log") 2>&1
  rc=$?
  if ((rc == 0)); then
    status[$name]="ok ($((SECONDS - t0))s)"
  elif ((rc == 124 || rc == 137)); then
    status[$name]="timeout after ${limit}s"
  else
    status[$name]="failed (rc $rc)"
  fi
  echo "-- $name: ${status[$name]}"
  ((rc == 0))
}
# The JSON after `RESULT ` in a phase's log, one field of it (empty if absent).
result() { grep -h '^RESULT ' "$out/$1.log" 2>/dev/null | tail -n1 | sed 's/^RESULT //' | python3 -c "import json,sys
try: v = json.load(sys.stdin).get('$2')
except Exception: v = None
print('' if v is None else v)"; }

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || echo "nvidia-smi failed"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' || true
echo "cuDNN and the CUDA runtime for cuDNN's attention, by the names the addon opens (its frontend takes .so.12 first):"
for lib in libcudnn.so.9 libcudart.so.13 libcudart.so.12; do
  found=$(IFS=:; for dir in ${LD_LIBRARY_PATH:-}; do [ -e "$dir/$lib" ] && { echo "$dir/$lib"; break; }; done)
  found=${found:-$(ldconfig -p 2>/dev/null | awk -v lib="$lib" '$1 == lib { print $NF; exit }')}
  echo "  $lib: ${found:-not found}"
done
echo "logs: $out"

phase unpack 120 tar -C "$work" -xJf "$root/.gpu-check/payload.tar.xz" || { echo "cannot unpack the payload: run scripts/pack-gpu-check.sh"; exit 1; }
echo "payload built from commit $(cat "$app/COMMIT" 2>/dev/null || echo unknown)"
"$node" --version
echo "ldd of the addon:"
ldd "$addon" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
echo "NCCL of the nccl test:"
ldd "$app/tests/nccl" | grep -E 'nccl|not found' || true

# ---------------------------------------------------------------- 1. correctness
# Where our cuDNN graphs run, cuDNN logs its errors (cudnn-errors-PHASE.log), and in the correctness phase the frontend
# also logs the graphs and plans it builds (level 10: without tensor dumps).
phase correctness 150 env CUDNN_LOGLEVEL_DBG=1 CUDNN_LOGDEST_DBG="$out/cudnn-errors-correctness.log" \
  CUDNN_FRONTEND_LOG_INFO=10 CUDNN_FRONTEND_LOG_FILE="$out/cudnn-frontend.log" \
  "$app/tests/cuda" --ignored --nocapture --test-threads=1 \
  || { grep -q 'no usable GPU' "$out/correctness.log" && status[correctness]="failed: no usable GPU"; }
phase kernels 35 env NANOGPT_TEST_DEVICE=cuda "$app/tests/cuda_kernels" --test-threads=1
# The fused step against the CPU step again (losses and gradients, 10 training steps), with attention on cuDNN where
# it takes it (bf16 without dropout).
phase kernels_cudnn 35 env NANOGPT_TEST_DEVICE=cuda NANOGPT_CUDA_ATTENTION=cudnn CUDNN_LOGLEVEL_DBG=1 \
  CUDNN_LOGDEST_DBG="$out/cudnn-errors-kernels_cudnn.log" "$app/tests/cuda_kernels" --test-threads=1 train_step::
kernel_shape=(--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=12 --vocab_size=50304)
phase kernel_bench_ours 25 env CUDNN_LOGLEVEL_DBG=1 CUDNN_LOGDEST_DBG="$out/cudnn-errors-kernel_bench_ours.log" \
  "$app/bench/cuda_kernels_bench" "${kernel_shape[@]}"
phase kernel_bench_torch 30 python3 "$root/bench/torch_ref.py" kernels "${kernel_shape[@]}"
phase nccl 120 "$app/tests/nccl" --ignored --nocapture --test-threads=1

# ---------------------------------------------------------------- 2. throughput, 124M shapes
shape=(--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=12)
phase torch_bench 180 python3 "$root/bench/torch_ref.py" bench "${shape[@]}" --profile=3
phase step_bench 90 "$app/bench/cuda_step_bench"
# The same with the attention kernels at 16 rows a warp rather than 32 (kernels/cuda/attention.rs's WarpRows).
phase step_bench_rows16 90 env NANOGPT_CUDA_ATTENTION_WARP_ROWS=16 "$app/bench/cuda_step_bench"
# The same with cuDNN's fused attention (kernels/cuda/attention.rs's AttentionKernels).
phase step_bench_cudnn 90 env NANOGPT_CUDA_ATTENTION=cudnn CUDNN_LOGLEVEL_DBG=1 \
  CUDNN_LOGDEST_DBG="$out/cudnn-errors-step_bench_cudnn.log" "$app/bench/cuda_step_bench"
phase our_bench 120 "$node" "$app/dist/cli.mjs" bench "${shape[@]}" --device=cuda --dtype=bfloat16
# The engine on candle's graph (NANOGPT_CUDA_STEP=graph) rather than the fused step, through the same CLI.
phase graph_bench 180 env NANOGPT_CUDA_STEP=graph "$node" "$app/dist/cli.mjs" bench "${shape[@]}" --device=cuda --dtype=bfloat16

# ---------------------------------------------------------------- 3. profile
phase profile_124m 90 "$node" "$app/dist/cli.mjs" bench "${shape[@]}" --device=cuda --dtype=bfloat16 \
  --warmup=3 --iters=5 --profile
mkdir -p "$work/data/shakespeare_char"
cp "$root/data/shakespeare_char/input.txt" "$work/data/shakespeare_char/input.txt"
phase prepare 60 "$node" "$app/dist/cli.mjs" prepare shakespeare_char --data_dir "$work/data"
char_shape=(--n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=64 --vocab_size=65)
phase profile_char 60 "$node" "$app/dist/cli.mjs" bench "${char_shape[@]}" --real_data \
  --dataset=shakespeare_char --data_dir="$work/data" --device=cuda --dtype=bfloat16 --warmup=5 --iters=20 --profile
# The same with the attention kernels at 16 rows a warp: with dropout, the dK/dV kernel of 32 rows spills more.
phase profile_char_rows16 60 env NANOGPT_CUDA_ATTENTION_WARP_ROWS=16 "$node" "$app/dist/cli.mjs" bench "${char_shape[@]}" \
  --real_data --dataset=shakespeare_char --data_dir="$work/data" --device=cuda --dtype=bfloat16 --warmup=5 --iters=20 --profile

# ---------------------------------------------------------------- 4. sampling
phase sample_xl 150 "$node" "$app/bench/sample.mjs" --device=cuda --shapes=gpt2-xl --trials=1

# ---------------------------------------------------------------- 5. shakespeare_char recipe
recipe=(--max_iters="$train_iters" --lr_decay_iters="$train_iters" --eval_iters=100)
phase torch_train 200 python3 "$root/bench/torch_ref.py" train --text="$work/data/shakespeare_char/input.txt" "${recipe[@]}"
t_ours=$SECONDS
phase our_train 240 "$node" "$app/dist/cli.mjs" train "$app/configs/train_shakespeare_char.mjs" \
  --device=cuda --dtype=bfloat16 --compile=False --data_dir="$work/data" --out_dir="$work/out" "${recipe[@]}"
ours_wall=n/a
[[ ${status[our_train]} == ok* ]] && ours_wall="$((SECONDS - t_ours)) (process)"

# ---------------------------------------------------------------- 6. the attention kernels under Nsight Compute
# One launch of each tensor-core attention kernel at 124M shapes with the hardware counters, where the machine lets
# ncu read them: occupancy, issue rate and the stall reasons, the evidence for the next change to these kernels.
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n1)
phase ncu_attention 150 "${ncu_bin:-ncu}" --clock-control none --kernel-name regex:'attention_.*_tc_' --launch-count 3 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
  --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' --csv --page details \
  "$app/bench/cuda_kernels_bench" "${kernel_shape[@]}" --warmup=0 --iters=1

# ---------------------------------------------------------------- summary
ours_best=$(grep -hoE 'val loss [0-9.]+' "$out/our_train.log" 2>/dev/null | awk '{print $3}' | sort -g | head -n1)
ours_last_iter=$(grep -hoE '^iter [0-9]+' "$out/our_train.log" 2>/dev/null | tail -n1 | awk '{print $2}')
ratio() { python3 -c "import sys
try: print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')
except Exception: print('n/a')" "$1" "$2"; }
gib() { python3 -c "import sys
try: print(f'{float(sys.argv[1]) / 2**30:.2f}')
except Exception: print('n/a')" "$1"; }
t_tok=$(result torch_bench tokens_per_s) o_tok=$(result our_bench tokens_per_s) f_tok=$(result step_bench tokens_per_s)
f16_tok=$(result step_bench_rows16 tokens_per_s) fc_tok=$(result step_bench_cudnn tokens_per_s)
g_tok=$(result graph_bench tokens_per_s)
t_wall=$(result torch_train wall_s) t_best=$(result torch_train best_val)

section "summary"
echo "payload: commit $(cat "$app/COMMIT" 2>/dev/null || echo unknown); GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
for name in unpack correctness kernels kernels_cudnn kernel_bench_ours kernel_bench_torch nccl torch_bench step_bench step_bench_rows16 \
  step_bench_cudnn our_bench \
  graph_bench profile_124m prepare profile_char profile_char_rows16 sample_xl torch_train our_train ncu_attention; do
  printf '%-19s %s\n' "$name" "${status[$name]:-not run}"
done
for log in "$out"/cudnn-errors-*.log; do
  [ -s "$log" ] && echo "${log##*/}: $(wc -l < "$log") lines (candidates cuDNN's heuristics reject land there too); the first \
error: $(grep -m1 -iE 'error|fail' "$log" | cut -c1-160)"
done
echo
echo "kernels, one launch each at 124M shapes, bf16 (median ms; n/a: that side has no such kernel or did not run):"
python3 - "$out/kernel_bench_ours.log" "$out/kernel_bench_torch.log" <<'TABLE'
import json, sys
def times(log):
    try: lines = open(log).read().splitlines()
    except OSError: return {}
    return {k["name"]: k["ms"] for k in (json.loads(l[len("KERNEL "):]) for l in lines if l.startswith("KERNEL "))}
ours, torch = times(sys.argv[1]), times(sys.argv[2])
print(f"  {'kernel':<24} {'ours ms':>10} {'torch ms':>10} {'ours/torch':>10}")
for name in list(ours) + [n for n in torch if n not in ours]:
    o, t = ours.get(name), torch.get(name)
    ratio = f"{o / t:.2f}" if o is not None and t else "n/a"
    print(f"  {name:<24} {'n/a' if o is None else o:>10} {'n/a' if t is None else t:>10} {ratio:>10}")
TABLE
echo
echo "device time per step by kernel, 3 profiled steps at 124M shapes: ours (the fused step, CUDA events around each"
echo "launch, examples/cuda_step_bench.rs), and its attention kernels at 16 rows a warp and on cuDNN; then PyTorch's"
echo "(torch.profiler, torch_ref.py bench --profile=3):"
python3 - "$out/step_bench.log" "$out/step_bench_rows16.log" "$out/step_bench_cudnn.log" "$out/torch_bench.log" <<'TABLE'
import json, sys
for side, log in zip(("ours", "ours, attention at 16 rows a warp", "ours, attention on cuDNN", "torch"), sys.argv[1:]):
    try: lines = open(log).read().splitlines()
    except OSError: lines = []
    kernels = [json.loads(l[len("STEP_KERNEL "):]) for l in lines if l.startswith("STEP_KERNEL ")]
    total = sum(k["ms_per_step"] for k in kernels)
    if not kernels:
        print(f"  {side}: n/a (its bench did not run or printed no profile)")
        continue
    attention_only = "attention " in side
    print(f"  {side}: {total:.2f} ms in all; " + ("its attention kernels:" if attention_only else "the largest:"))
    for k in [k for k in kernels if "attention" in k["name"]] if attention_only else kernels[:20]:
        print(f"    {k['name'][:70]:<70} {k['launches_per_step']:>5g} x {k['ms_per_step']:>8.3f} ms {100 * k['ms_per_step'] / total:>5.1f}%")
TABLE
echo
echo "profile (ms per step: data / forward / backward / optimizer):"
for name in profile_124m profile_char profile_char_rows16; do
  printf '  %-19s %s\n' "$name" "$(result "$name" phases | tr -d "{}'" )"
done
echo
printf '%-34s %14s %14s %8s\n' "" "torch_ref.py" "nanogpt-rs" "ours/ref"
printf '%-34s %14s %14s %8s\n' "124M bench bf16 tokens/s" "${t_tok:-n/a}" "${o_tok:-n/a}" "$(ratio "$o_tok" "$t_tok")"
printf '%-34s %14s %14s %8s\n' "124M bench ms/iter" "$(result torch_bench ms_per_iter)" "$(result our_bench ms_per_iter)" \
  "$(ratio "$(result our_bench ms_per_iter)" "$(result torch_bench ms_per_iter)")"
printf '%-34s %14s %14s %8s\n' "124M bench peak memory GiB" "$(result torch_bench peak_mem_gb)" "$(gib "$(result our_bench peak_mem_bytes)")" ""
printf '%-34s %14s %14s %8s\n' "124M fused step tokens/s" "${t_tok:-n/a}" "${f_tok:-n/a}" "$(ratio "$f_tok" "$t_tok")"
printf '%-34s %14s %14s %8s\n' "  attention 16 rows a warp" "${t_tok:-n/a}" "${f16_tok:-n/a}" "$(ratio "$f16_tok" "$t_tok")"
printf '%-34s %14s %14s %8s\n' "  attention on cuDNN" "${t_tok:-n/a}" "${fc_tok:-n/a}" "$(ratio "$fc_tok" "$t_tok")"
printf '%-34s %14s %14s %8s\n' "124M bench, graph, tokens/s" "${t_tok:-n/a}" "${g_tok:-n/a}" "$(ratio "$g_tok" "$t_tok")"
printf '%-34s %14s %14s %8s\n' "124M fused step MFU" "$(result torch_bench mfu_h100_989)" "$(result step_bench mfu)" ""
printf '%-34s %14s %14s %8s\n' "124M fused step peak memory GiB" "$(result torch_bench peak_mem_gb)" "$(gib "$(result step_bench peak_mem_bytes)")" ""
printf '%-34s %14s %14s %8s\n' "GPT-2 XL sampling tokens/s" "$(result sample_xl torch_tokens_per_s)" "$(result sample_xl tokens_per_s)" \
  "$(result sample_xl ratio)"
printf '%-34s %14s %14s %8s\n' "char recipe ($train_iters it) best val" "${t_best:-n/a}" "${ours_best:-n/a}" ""
printf '%-34s %14s %14s %8s\n' "char recipe wall s" "${t_wall:-n/a}" "$ours_wall" "$(ratio "${ours_wall% *}" "$t_wall")"
[ -n "$ours_last_iter" ] && echo "(our train reached iter $ours_last_iter of $train_iters; torch's wall time excludes start-up, ours includes it)"
echo
echo "attention kernels under Nsight Compute (one launch each at 124M shapes; the top stall reasons in warps per issue):"
python3 - "$out/ncu_attention.log" <<'TABLE'
import csv, sys
try: lines = [l for l in open(sys.argv[1]).read().splitlines() if l.startswith('"')]
except OSError: lines = []
rows = list(csv.DictReader(lines))
kernels = {}
for r in rows:
    key = (r.get("ID"), r.get("Kernel Name", "?"))
    kernels.setdefault(key, {})[r.get("Metric Name", "")] = (r.get("Metric Value", ""), r.get("Metric Unit", ""))
if not kernels:
    print("  n/a (the phase did not run, or ncu could not read the counters: see ncu_attention.log)")
wanted = ["Duration", "Registers Per Thread", "Achieved Occupancy", "Issue Slots Busy", "Eligible Warps Per Scheduler",
          "Warp Cycles Per Issued Instruction", "Compute (SM) Throughput", "Memory Throughput"]
for (_, name), metrics in kernels.items():
    shown = ", ".join(f"{m} {metrics[m][0]} {metrics[m][1]}".rstrip() for m in wanted if m in metrics)
    print(f"  {name.split('(')[0]}: {shown}")
    stalls = []
    for m, (value, _) in metrics.items():
        if "issue_stalled_" in m and m.endswith("per_issue_active.ratio"):
            try: stalls.append((float(value.replace(",", "")), m.split("issue_stalled_")[1].split("_per_issue")[0]))
            except ValueError: pass
    if stalls:
        print("    stalls: " + ", ".join(f"{reason} {value:.2f}" for value, reason in sorted(stalls, reverse=True)[:6]))
TABLE
exit 0
