import { describe, expect, it } from 'vitest';
import { parseBenchArgs, runBench, type BenchEngine } from '../ts/bench.ts';
import { benchDefaults, trainSchema } from '../ts/config.ts';
import { Engine } from '../ts/engine.ts';
import { UserError } from '../ts/errors.ts';

const tiny = { n_layer: 1, n_head: 2, n_embd: 32, block_size: 16, batch_size: 2, vocab_size: 64, warmup: 1, iters: 2 };

describe('bench', () => {
  it("defaults to bench.py's GPT-2 124M shapes in bfloat16, on train's default device", () => {
    expect(parseBenchArgs([])).toEqual({});
    expect(benchDefaults).toMatchObject({ batch_size: 12, block_size: 1024, n_layer: 12, n_head: 12, n_embd: 768, vocab_size: 50304, dtype: 'bfloat16' });
    expect(benchDefaults.device).toBe(trainSchema.device.default);
    expect(parseBenchArgs(['--batch_size=4', '--real_data', '--dtype=float32', '--device=cpu'])).toMatchObject({
      batch_size: 4,
      real_data: true,
      dtype: 'float32',
      device: 'cpu',
    });
    expect(() => parseBenchArgs(['--batchsize=4'])).toThrow(/unknown bench argument/);
    expect(() => parseBenchArgs(['--constructor=1'])).toThrow(/unknown bench argument/);
    expect(() => parseBenchArgs(['--dtype=float64'])).toThrow(/dtype/);
  });

  it('times training steps of the CPU engine, in float32 whatever dtype says', () => {
    const lines: string[] = [];
    const result = runBench({ ...tiny, device: 'cpu', dtype: 'bfloat16' }, Engine.create, (line) => lines.push(line));
    expect(result.dtype).toBe('float32');
    expect(lines).toContain('note: dtype=bfloat16 has no effect on cpu: the engine computes in float32');
    expect(result.ms_per_iter).toBeGreaterThan(0);
    expect(result.tokens_per_s).toBeGreaterThan(0);
    expect(result.mfu).toBeNull();
    expect(result.peak_mem_bytes).toBeNull();
    expect(Number.isFinite(result.loss)).toBe(true);
    expect(lines.some((l) => l.startsWith('time per iteration:'))).toBe(true);
  });

  it("says nothing of dtype on the CPU unless it was set, as train does", () => {
    const lines: string[] = [];
    runBench({ ...tiny, ...parseBenchArgs(['--device=cpu']) }, Engine.create, (line) => lines.push(line));
    expect(lines.filter((l) => l.startsWith('note:'))).toEqual([]);
  });

  it('says in one line what the engine refuses: a shape, phase timing on the WebAssembly engine', () => {
    const refusal = (options: Parameters<typeof runBench>[0]) => {
      try {
        runBench(options, Engine.create, () => {});
      } catch (err) {
        expect(err).toBeInstanceOf(UserError);
        expect((err as Error).message).not.toContain('\n');
        return (err as Error).message;
      }
      throw new Error('the bench ran');
    };
    expect(refusal({ ...tiny, n_embd: 33, device: 'cpu', dtype: 'float32' })).toMatch(/^cannot create the model: n_embd \(33\).*n_head/);
    // bench.py's own shapes, the defaults, would not fit in wasm32's 4 GiB; nor would GPT-2 XL's weights alone, which
    // are refused before the engine would try to create them.
    expect(refusal(parseBenchArgs(['--device=cpu', '--engine=wasm', '--n_layer=48', '--n_head=25', '--n_embd=1600', '--batch_size=1', '--block_size=64']))).toMatch(
      /^this benchmark needs about [\d.]+ GiB \(parameters [\d.]+ GiB, .*more than the WebAssembly engine's 4 GiB/,
    );
    expect(refusal(parseBenchArgs(['--device=cpu', '--engine=wasm']))).toMatch(
      /^this benchmark needs about [\d.]+ GiB \(parameters .*activations [\d.]+ GiB\), more than the WebAssembly engine's 4 GiB; lower batch_size \(now 12\) or block_size \(1024\), use a smaller model, or --engine=native$/,
    );
    expect(refusal({ ...tiny, device: 'cpu', engine: 'wasm', dtype: 'float32', profile: true })).toMatch(
      /^cannot profile: .*--engine=native/,
    );
  });

  it("sets the engine's precision and averages its phase times when profiling", () => {
    const calls: string[] = [];
    const engine: BenchEngine = {
      numParams: () => 1000,
      configureOptimizer: () => ({ decay_tensors: 1, decay_params: 1, no_decay_tensors: 0, no_decay_params: 0 }),
      forwardBackward: () => 3,
      step: () => ({ grad_norm: 1, clipped: false, skipped: false, update_ratios: [] }),
      setPrecision: (dtype) => calls.push(`precision ${dtype}`),
      synchronize: () => calls.push('sync'),
      memoryStats: () => ({ in_use_bytes: 1, peak_bytes: 2048, free_bytes: 0, total_bytes: 4096 }),
      setProfiling: (on) => calls.push(`profiling ${on}`),
      phaseTimes: () => ({ data_ms: 1, forward_ms: 2, backward_ms: 4, optimizer_ms: 1 }),
    };
    const result = runBench({ ...tiny, device: 'cuda', profile: true }, () => engine, () => {});
    expect(calls[0]).toBe('precision bfloat16');
    expect(calls).toContain('profiling true');
    expect(result.peak_mem_bytes).toBe(2048);
    expect(result.phases).toMatchObject({ forward_ms: 2, backward_ms: 4, optimizer_ms: 1 });
    expect(result.loss).toBe(3);
  });
});
