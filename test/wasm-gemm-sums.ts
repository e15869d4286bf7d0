// Checksums of the engine's matrix products at shapes that are not multiples of the WebAssembly kernel's register
// tile or blocks (test/wasm-gemm.test.ts). Run as a script, prints the WebAssembly build's as JSON, so that the test
// can load the other build of the module (NANOGPT_WASM_BUILD) in a process of its own.
import { fileURLToPath } from 'node:url';
import { engineBuild, repeatLinear, type EngineKind } from '../ts/engine.ts';

/** (rows, c, oc): one element; below one tile; ragged in every direction; past the depth and width blocks; the recipe's. */
export const shapes = [
  [1, 1, 1],
  [5, 3, 130],
  [37, 29, 19],
  [100, 257, 9],
  [97, 300, 261],
  [768, 128, 384],
] as const;
export const passes = ['forward', 'backward'] as const;

/** One checksum of the products' outputs per shape and pass (each output weighted by its position). */
export function checksums(kind: EngineKind): number[] {
  return shapes.flatMap(([n, c, oc]) => passes.map((pass) => repeatLinear(kind, pass, n, c, oc, 1)));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  console.log(JSON.stringify({ build: engineBuild('wasm'), sums: checksums('wasm') }));
}
