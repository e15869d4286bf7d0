#!/usr/bin/env bash
# The machine's f32 compute ceiling, to read the CPU benchmarks against: GFLOP/s of fused multiply-adds with
# 128-bit vectors (what WebAssembly's SIMD reaches), 256-bit (AVX2) and 512-bit (AVX-512) where the CPU has them,
# with one process per core running at once. Needs gcc. Twelve independent accumulators keep the FMA units busy
# whatever their latency.
# Usage: bash bench/peak.sh
set -euo pipefail
export LC_ALL=C
command -v gcc >/dev/null || { echo "error: bench/peak.sh needs gcc (apt-get install gcc)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cores=$(nproc)
cat > "$work/peak.c" <<'C'
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#define STEPS 100000000L
int main(void) {
  VEC acc[12], b = SET1(0.999999f), c = SET1(1e-7f);
  for (int i = 0; i < 12; i++) acc[i] = SET1((float)i);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long step = 0; step < STEPS; step++)
    for (int i = 0; i < 12; i++) acc[i] = FMA(acc[i], b, c);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  float keep = 0;
  for (int i = 0; i < 12; i++) keep += ((float*)&acc[i])[0];
  double seconds = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  printf("%.1f %g\n", STEPS * 12.0 * (sizeof(VEC) / 4) * 2 / seconds / 1e9, keep);
  return 0;
}
C
echo "f32 fused multiply-add peak, $cores cores at once (GFLOP/s, all cores, then per core):"
for width in 128 256 512; do
  case $width in
    128) flags=(-mfma) defs=(-DVEC=__m128 -DSET1=_mm_set1_ps -DFMA=_mm_fmadd_ps) need=fma ;;
    256) flags=(-mavx2 -mfma) defs=(-DVEC=__m256 -DSET1=_mm256_set1_ps -DFMA=_mm256_fmadd_ps) need=avx2 ;;
    512) flags=(-mavx512f) defs=(-DVEC=__m512 -DSET1=_mm512_set1_ps -DFMA=_mm512_fmadd_ps) need=avx512f ;;
  esac
  if ! grep -qw "$need" /proc/cpuinfo; then
    echo "  ${width}-bit: the CPU has no $need"
    continue
  fi
  gcc -O3 "${flags[@]}" "${defs[@]}" -o "$work/peak$width" "$work/peak.c"
  for _ in $(seq "$cores"); do "$work/peak$width" > "$work/out.$width.$_" & done
  wait
  total=$(cat "$work"/out."$width".* | awk '{ s += $1 } END { printf "%.1f", s }')
  echo "  ${width}-bit: $total ($(awk -v t="$total" -v n="$cores" 'BEGIN { printf "%.1f", t / n }') per core)"
done
