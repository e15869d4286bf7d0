// The WebAssembly engine is built twice (scripts/build-wasm.sh): with relaxed SIMD, whose fused multiply-adds make its
// matrix products faster, and with SIMD128 only. Both export the same functions through the same glue; this picks
// the module the running engine can compile. Browser-safe: the training page's worker uses it too.

/** The one WebAssembly call made here, typed locally: the CLI compiles without the DOM library's declarations. */
declare const WebAssembly: { validate(bytes: Uint8Array): boolean };

/** One build of the module: its file in wasm/, and how it is named in engine info and benchmark output. */
export interface WasmBuild {
  file: string;
  name: string;
}

export const wasmBuilds = {
  'relaxed-simd': { file: 'nanogpt_relaxed_bg.wasm', name: 'wasm (relaxed-simd)' },
  simd128: { file: 'nanogpt_bg.wasm', name: 'wasm (simd128)' },
} as const satisfies Record<string, WasmBuild>;

export type WasmBuildChoice = keyof typeof wasmBuilds;

/** `(func (param v128 v128 v128) (result v128) local.get 0 local.get 1 local.get 2 f32x4.relaxed_madd)`. */
const relaxedSimdProbe = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
  0x01, 0x08, 0x01, 0x60, 0x03, 0x7b, 0x7b, 0x7b, 0x01, 0x7b, // type: (v128 v128 v128) -> v128
  0x03, 0x02, 0x01, 0x00, // one function of that type
  0x0a, 0x0d, 0x01, 0x0b, 0x00, 0x20, 0x00, 0x20, 0x01, 0x20, 0x02, 0xfd, 0x85, 0x02, 0x0b, // its body
]);

/** Whether this runtime compiles relaxed SIMD (Node.js 20 only after `--experimental-wasm-relaxed-simd`). */
export function hasRelaxedSimd(): boolean {
  return WebAssembly.validate(relaxedSimdProbe);
}

/** The relaxed-SIMD build where the runtime has relaxed SIMD, else the SIMD128 one. */
export function pickWasmBuild(): WasmBuild {
  return hasRelaxedSimd() ? wasmBuilds['relaxed-simd'] : wasmBuilds.simd128;
}
