// `bench` for the GPU check (bench/gpu-check.sh), on an addon given by path:
//   node gpu-bench.mjs <addon.node> [--key=value ...]      (keys as `runBench`'s options)
// It talks to the addon directly because ts/engine.ts's Engine does not pass on the device-level calls (precision,
// synchronisation, memory figures, phase times) yet; once it does, `nanogpt-rs bench` replaces this file.
import { createRequire } from 'node:module';
import { resolve } from 'node:path';
import { parseBenchArgs, runBench, type BenchEngine, type MemoryStats, type PhaseTimes } from '../ts/bench.ts';
import type { ModelArgs } from '../ts/engine.ts';

interface NativeGpt {
  numParams(nonEmbedding: boolean): number;
  configureOptimizer(json: string): string;
  forwardBackward(x: Uint32Array, y: Int32Array, batchSize: number, lossScale: number): number;
  step(lr: number): string;
  setPrecision(dtype: string): void;
  synchronize(): void;
  memoryStats(): string;
  setProfiling(on: boolean): void;
  phaseTimes(): string;
}

const [addonPath, ...args] = process.argv.slice(2);
if (!addonPath?.endsWith('.node')) {
  console.error('usage: node gpu-bench.mjs <addon.node> [--key=value ...]');
  process.exit(2);
}
const native = createRequire(import.meta.url)(resolve(addonPath)) as {
  Gpt: { create(argsJson: string, seed: number, device: string): NativeGpt };
};

function create(modelArgs: ModelArgs, seed: number, device: string): BenchEngine {
  const gpt = native.Gpt.create(JSON.stringify(modelArgs), seed, device);
  return {
    numParams: (nonEmbedding = true) => gpt.numParams(nonEmbedding),
    configureOptimizer: (a) => JSON.parse(gpt.configureOptimizer(JSON.stringify(a))),
    forwardBackward: (x, y, b, lossScale = 1) => gpt.forwardBackward(x, y, b, lossScale),
    step: (lr) => JSON.parse(gpt.step(lr)),
    setPrecision: (dtype) => gpt.setPrecision(dtype),
    synchronize: () => gpt.synchronize(),
    memoryStats: () => JSON.parse(gpt.memoryStats()) as MemoryStats | null,
    setProfiling: (on) => gpt.setProfiling(on),
    phaseTimes: () => JSON.parse(gpt.phaseTimes()) as PhaseTimes | null,
  };
}

try {
  console.log('RESULT ' + JSON.stringify(runBench(parseBenchArgs(args), create)));
} catch (err) {
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
}
