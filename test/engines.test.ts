// The engine API run against both builds of the Rust engine: the napi addon and the WebAssembly module. Both must
// be built (`npm run build:native`, `npm run build:wasm`); a missing one fails these tests rather than skipping.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine, type EngineKind, type ModelArgs } from '../ts/engine.ts';
import { Rng } from '../ts/rng.ts';
import { readTensors, writeTensors, type Tensors } from './safetensors.ts';

const work = mkdtempSync(join(tmpdir(), 'nanogpt-engines-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

const kinds: EngineKind[] = ['native', 'wasm'];
const args: ModelArgs = { n_layer: 2, n_head: 2, n_embd: 32, block_size: 16, bias: true, vocab_size: 65, dropout: 0.1 };
const optimizer = { weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0 };
const batchSize = 4;

/** The same token batches for every engine. */
function batches(count: number, seed = 7): Array<{ x: Uint32Array; y: Int32Array }> {
  const rng = new Rng(seed);
  return Array.from({ length: count }, () => {
    const tokens = Array.from({ length: batchSize * (args.block_size + 1) }, () => rng.nextInt(args.vocab_size));
    const x = new Uint32Array(batchSize * args.block_size);
    const y = new Int32Array(batchSize * args.block_size);
    for (let row = 0; row < batchSize; row++) {
      for (let t = 0; t < args.block_size; t++) {
        x[row * args.block_size + t] = tokens[row * (args.block_size + 1) + t];
        y[row * args.block_size + t] = tokens[row * (args.block_size + 1) + t + 1];
      }
    }
    return { x, y };
  });
}

/** Training losses of `steps` optimizer steps (two micro-steps each) from seed 1337. */
function trainLosses(engine: Engine, steps: number): number[] {
  const losses: number[] = [];
  const data = batches(2 * steps);
  for (let step = 0; step < steps; step++) {
    for (const { x, y } of data.slice(2 * step, 2 * step + 2)) losses.push(engine.forwardBackward(x, y, batchSize, 0.5));
    engine.step(1e-2);
  }
  return losses;
}

function expectClose(actual: number[], expected: number[], relative: number): void {
  expect(actual.length).toBe(expected.length);
  actual.forEach((value, i) => expect(Math.abs(value - expected[i]), `value ${i}: ${value} vs ${expected[i]}`).toBeLessThanOrEqual(relative * Math.abs(expected[i])));
}

describe('both engines', () => {
  it('give the same losses for the same seed and batches (dropout on)', () => {
    const losses = kinds.map((kind) => {
      const engine = Engine.create(args, 1337, 'cpu', kind);
      expect(engine.kind).toBe(kind);
      engine.configureOptimizer(optimizer);
      return trainLosses(engine, 4);
    });
    expectClose(losses[1], losses[0], 1e-4);
  });

  it('sample the same tokens for the same seed', () => {
    const samples = kinds.map((other) => Array.from(Engine.create(args, 21, 'cpu', other).generate(Uint32Array.from([1, 2, 3]), 20, 0.8, 10, 5)));
    expect(samples[0]).toHaveLength(23);
    expect(samples[1]).toEqual(samples[0]);
  });

  it('are chosen by device and --engine, with one-line errors for what cannot run', () => {
    expect(Engine.create(args, 1).kind).toBe('wasm');
    expect(Engine.create(args, 1, 'cpu', 'native').kind).toBe('native');
    expect(() => Engine.create(args, 1, 'cuda', 'wasm')).toThrow(/^the WebAssembly engine runs on the cpu only; use --device=cpu, or --engine=native/);
  });

  it("load in a browser's way too: the ES module glue over the same .wasm samples the same tokens", async () => {
    const web = (await import(fileURLToPath(new URL('../wasm/web/nanogpt.js', import.meta.url)))) as {
      initSync(options: { module: Uint8Array }): void;
      Gpt: { create(args: ModelArgs, seed: number): { generate(...a: [Uint32Array, number, number, number, number]): Uint32Array } };
    };
    web.initSync({ module: readFileSync(fileURLToPath(new URL('../wasm/nanogpt_bg.wasm', import.meta.url))) });
    const prompt = Uint32Array.from([1, 2, 3]);
    const fromWeb = web.Gpt.create(args, 21).generate(prompt, 20, 0.8, 10, 5);
    expect(Array.from(fromWeb)).toEqual(Array.from(Engine.create(args, 21, 'cpu', 'wasm').generate(prompt, 20, 0.8, 10, 5)));
  });

  for (const [writer, reader] of [kinds, [...kinds].reverse()]) {
    it(`load checkpoints written by the other: ${writer} -> ${reader}`, () => {
      // Without dropout, so that the next step does not depend on where each engine's dropout stream is.
      const noDropout = { ...args, dropout: 0 };
      const trained = Engine.create(noDropout, 1337, 'cpu', writer);
      trained.configureOptimizer(optimizer);
      trainLosses(trained, 2);
      const weights = join(work, `${writer}-weights.safetensors`);
      const state = join(work, `${writer}-optimizer.safetensors`);
      trained.saveWeightsFile(weights);
      trained.saveOptimizerFile(state);

      const resumed = Engine.fromSafetensorsFile(noDropout, weights, 'cpu', reader);
      resumed.configureOptimizer(optimizer);
      resumed.loadOptimizerFile(state);
      const [{ x, y }] = batches(1, 99);
      expectClose([resumed.evalLoss(x, y, batchSize)], [trained.evalLoss(x, y, batchSize)], 1e-5);
      // Optimizer moments came along too: the next update moves both models the same way.
      for (const engine of [trained, resumed]) {
        engine.forwardBackward(x, y, batchSize, 1);
        engine.step(1e-2);
      }
      expectClose([resumed.evalLoss(x, y, batchSize)], [trained.evalLoss(x, y, batchSize)], 1e-4);
    });
  }
});

describe.each(kinds)('the %s engine', (kind) => {
  it('computes gradients that match finite differences of the loss', () => {
    const noDropout = { ...args, dropout: 0 };
    const engine = Engine.create(noDropout, 3, 'cpu', kind);
    const [{ x, y }] = batches(1, 11);
    engine.forwardBackward(x, y, batchSize, 1);
    const weightsPath = join(work, `${kind}-fd-weights.safetensors`);
    const gradsPath = join(work, `${kind}-fd-grads.safetensors`);
    engine.saveWeightsFile(weightsPath);
    engine.saveGradientsFile(gradsPath);
    const weights = readTensors(weightsPath);
    const grads = readTensors(gradsPath);
    expect([...grads.keys()].sort()).toEqual([...weights.keys()].sort());

    const rng = new Rng(5);
    const random = new Map([...weights].map(([name, t]) => [name, t.data.map(() => rng.nextFloat() - 0.5)]));
    const along = new Map([...grads].map(([name, t]) => [name, t.data]));
    for (const direction of [random, along]) {
      // Unit length over all parameters, so the step size means the same in every direction.
      const norm = Math.sqrt([...direction.values()].reduce((s, d) => s + d.reduce((a, v) => a + v * v, 0), 0));
      const unit = new Map([...direction].map(([name, d]) => [name, d.map((v) => v / norm)]));
      const analytic = [...grads].reduce((s, [name, g]) => s + g.data.reduce((a, v, i) => a + v * unit.get(name)![i], 0), 0);
      const lossAt = (epsilon: number) => {
        const moved: Tensors = new Map(
          [...weights].map(([name, t]) => [name, { shape: t.shape, data: t.data.map((v, i) => v + epsilon * unit.get(name)![i]) }]),
        );
        const path = join(work, `${kind}-fd-moved.safetensors`);
        writeTensors(path, moved);
        return Engine.fromSafetensorsFile(noDropout, path, 'cpu', kind).evalLoss(x, y, batchSize);
      };
      const epsilon = 1e-2;
      const numeric = (lossAt(epsilon) - lossAt(-epsilon)) / (2 * epsilon);
      expect(Math.abs(numeric - analytic), `numeric ${numeric} vs analytic ${analytic}`).toBeLessThanOrEqual(2e-3 + 2e-2 * Math.abs(analytic));
    }
  });

  it('says before the first step when a run cannot fit in memory', () => {
    const engine = Engine.create(args, 1, 'cpu', kind);
    expect(engine.checkMemory(batchSize, 'train').total).toBeGreaterThan(0);
    // A million rows of activations would need hundreds of GiB: only the WebAssembly engine has a hard ceiling.
    const huge = () => engine.checkMemory(1_000_000, 'train');
    if (kind === 'native') expect(huge().total).toBeGreaterThan(4 * 2 ** 30);
    else expect(huge).toThrow(/needs about .* GiB .*more than the WebAssembly engine's 4 GiB; lower batch_size \(now 1000000/);
  });
});
