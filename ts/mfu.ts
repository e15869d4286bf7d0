// Model FLOPs utilisation as nanoGPT's estimate_mfu computes it (the PaLM paper's 6N + 12LHQT FLOPs per token),
// but against the peak of the GPU that actually runs, not a fixed A100 figure (which reads above 100% on an H100
// and near zero on small cards).
import { execFileSync } from 'node:child_process';
import type { ModelArgs } from './engine.ts';

/** Dense bf16 tensor-core peaks in FLOP/s, by a name fragment as nvidia-smi reports it; most specific first. */
const gpuPeaks: Array<[RegExp, number]> = [
  [/H200/i, 989e12],
  [/H100.*PCIe/i, 756e12],
  [/H100/i, 989e12],
  [/GH200/i, 989e12],
  [/B200/i, 2250e12],
  [/A100/i, 312e12],
  [/A800/i, 312e12],
  [/L40S/i, 362e12],
  [/L40/i, 181e12],
  [/L4\b/i, 121e12],
  [/A10G/i, 70e12],
  [/A10\b/i, 125e12],
  [/RTX 4090/i, 165e12],
  [/RTX 3090/i, 71e12],
  [/V100/i, 125e12],
  [/T4\b/i, 65e12],
];

/** The peak for a GPU name, or null when the name is not in the table. */
export function peakFlops(gpuName: string): number | null {
  return gpuPeaks.find(([pattern]) => pattern.test(gpuName))?.[1] ?? null;
}

/** The first GPU's name from nvidia-smi, or null where there is none. */
export function gpuName(): string | null {
  try {
    return execFileSync('nvidia-smi', ['--query-gpu=name', '--format=csv,noheader'], { encoding: 'utf8', timeout: 5000 }).split('\n')[0].trim() || null;
  } catch {
    return null;
  }
}

/** nanoGPT's FLOPs per optimizer step: (6N + 12 L H Q T) per token, times the tokens of the step. */
export function flopsPerIter(args: ModelArgs, nonEmbeddingParams: number, tokensPerIter: number): number {
  const headDim = args.n_embd / args.n_head;
  const flopsPerToken = 6 * nonEmbeddingParams + 12 * args.n_layer * args.n_head * headDim * args.block_size;
  return flopsPerToken * tokensPerIter;
}

/** nanoGPT's smoothed MFU: the first five iterations of a run are warm-up; then 0.9 old + 0.1 new. */
export class MfuMeter {
  private running = -1;

  /** `peak` null (a CPU, or an unknown GPU) makes every reading null. */
  constructor(
    private readonly flopsPerStep: number,
    private readonly peak: number | null,
  ) {}

  update(localIter: number, dtMs: number): number | null {
    if (this.peak === null) return null;
    if (localIter >= 5) {
      const mfu = this.flopsPerStep / (dtMs / 1000) / this.peak;
      this.running = this.running === -1 ? mfu : 0.9 * this.running + 0.1 * mfu;
    }
    return this.running;
  }
}

export function formatMfu(mfu: number | null): string {
  return mfu === null ? 'n/a' : `${(mfu * 100).toFixed(2)}%`;
}
