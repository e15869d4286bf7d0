// GFLOP/s of the engine's matrix products at the README CPU recipe's shapes (batch 12 x 64 = 768 rows, 128 wide),
// in the WebAssembly build and in the native build, measured in the same run: each linear layer's forward
// (inp Wᵀ) and backward (dout W and doutᵀ inp), on one thread of each engine's pool, as the training step's batch
// shards run them. The two builds take turns, and each figure is the best of `--trials` timings.
//
// Usage: npx tsx bench/gemm.ts [--rows=768] [--trials=3]      (npm run bench:gemm)
//   NANOGPT_WASM_BUILD=simd128 times the WebAssembly build without relaxed SIMD.
import { performance } from 'node:perf_hooks';
import { engineBuild, repeatLinear, type EngineKind } from '../ts/engine.ts';

const options = { rows: 768, trials: 3 };
for (const arg of process.argv.slice(2)) {
  const match = /^--(rows|trials)=(\d+)$/.exec(arg);
  if (!match || Number(match[2]) < 1) {
    console.error(`error: unknown argument '${arg}'; usage: npx tsx bench/gemm.ts [--rows=768] [--trials=3]`);
    process.exit(2);
  }
  options[match[1] as keyof typeof options] = Number(match[2]);
}

/** The recipe's linear layers (n_embd 128): the fused q,k,v projection, the attention output, the MLP's two. */
const layers = [
  { name: 'attn qkv', c: 128, oc: 384 },
  { name: 'attn proj', c: 128, oc: 128 },
  { name: 'mlp fc', c: 128, oc: 512 },
  { name: 'mlp proj', c: 512, oc: 128 },
];
const passes = ['forward', 'backward'] as const;
const engines: EngineKind[] = ['wasm', 'native'];
/** Work per timing, in floating-point operations: enough to dwarf the call, little enough to repeat. */
const flopsPerTiming = 3e8;

const n = options.rows;
console.log(`matrix products, ${n} rows, one thread each: ${engines.map(engineBuild).join(' against ')}`);
console.log(['layer', 'c -> oc', 'pass', `${engineBuild('wasm')} GFLOP/s`, 'native GFLOP/s', 'wasm / native'].join('\t'));
for (const { name, c, oc } of layers) {
  for (const pass of passes) {
    const flops = (pass === 'forward' ? 2 : 4) * n * c * oc;
    const reps = Math.ceil(flopsPerTiming / flops);
    const best = new Map<EngineKind, number>();
    for (const engine of engines) repeatLinear(engine, pass, n, c, oc, 1);
    for (let trial = 0; trial < options.trials; trial++) {
      for (const engine of engines) {
        const start = performance.now();
        repeatLinear(engine, pass, n, c, oc, reps);
        const seconds = (performance.now() - start) / 1e3;
        best.set(engine, Math.min(best.get(engine) ?? Infinity, seconds));
      }
    }
    const gflops = engines.map((engine) => (flops * reps) / best.get(engine)! / 1e9);
    console.log([name, `${c} -> ${oc}`, pass, gflops[0].toFixed(2), gflops[1].toFixed(2), (gflops[0] / gflops[1]).toFixed(2)].join('\t'));
  }
}
