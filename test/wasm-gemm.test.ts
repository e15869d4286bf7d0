// The WebAssembly engine's own matrix products (kernels/gemm_wasm.rs), in both builds of the module (relaxed SIMD and
// SIMD128 only), against the native build's (the gemm crate), at shapes that are not multiples of the register tile
// or of the blocks. Both engine builds must be built (`npm run build:native`, `npm run build:wasm`).
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { engineBuild } from '../ts/engine.ts';
import { checksums, passes, shapes } from './wasm-gemm-sums.ts';

/** The same checksums from the WebAssembly build `build`, loaded in a process of its own. */
function checksumsOfBuild(build: string): { build: string; sums: number[] } {
  const script = fileURLToPath(new URL('./wasm-gemm-sums.ts', import.meta.url));
  const child = spawnSync(process.execPath, ['--import', 'tsx', script], {
    cwd: fileURLToPath(new URL('..', import.meta.url)),
    encoding: 'utf8',
    env: { ...process.env, NANOGPT_WASM_BUILD: build },
  });
  expect(child.status, child.stderr).toBe(0);
  return JSON.parse(child.stdout) as { build: string; sums: number[] };
}

function expectClose(actual: number[], expected: number[]): void {
  expect(actual.length).toBe(expected.length);
  actual.forEach((value, i) => {
    const [n, c, oc] = shapes[Math.floor(i / passes.length)];
    const what = `${passes[i % passes.length]} ${n} x ${c} -> ${oc}: ${value} vs ${expected[i]}`;
    // Products of up to 300 terms, summed in another order (and fused, with relaxed SIMD).
    expect(Math.abs(value - expected[i]), what).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(expected[i])));
  });
}

describe('the WebAssembly matrix products', () => {
  const native = checksums('native');

  it('load the relaxed-SIMD build on this Node.js (its flag set before the module compiles)', () => {
    expect(engineBuild('wasm')).toBe('wasm (relaxed-simd)');
  });

  it('match the native build at ragged shapes, with relaxed SIMD', () => {
    expectClose(checksums('wasm'), native);
  });

  it('match the native build at ragged shapes, with SIMD128 only', () => {
    const { build, sums } = checksumsOfBuild('simd128');
    expect(build).toBe('wasm (simd128)');
    expectClose(sums, native);
  });
});
