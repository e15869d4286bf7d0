import { describe, expect, it } from 'vitest';
import { flopsPerIter, formatMfu, MfuMeter, peakFlops } from '../ts/mfu.ts';

const owt = { n_layer: 12, n_head: 12, n_embd: 768, block_size: 1024, bias: false, vocab_size: 50304, dropout: 0 };
const shakespeare = { n_layer: 6, n_head: 6, n_embd: 384, block_size: 256, bias: false, vocab_size: 65, dropout: 0.2 };

describe('mfu', () => {
  it("counts FLOPs per token as nanoGPT's estimate_mfu", () => {
    expect(flopsPerIter(owt, 123_587_328, 1)).toBe(854_770_176);
    expect(flopsPerIter(shakespeare, 10_646_784, 1)).toBe(70_958_592);
    expect(flopsPerIter(shakespeare, 10_646_784, 64 * 256)).toBe(70_958_592 * 64 * 256);
  });

  it('uses the running GPU peak, not a fixed A100 figure', () => {
    expect(peakFlops('NVIDIA H100 80GB HBM3')).toBe(989e12);
    expect(peakFlops('NVIDIA H100 PCIe')).toBe(756e12);
    expect(peakFlops('NVIDIA A100-SXM4-40GB')).toBe(312e12);
    expect(peakFlops('NVIDIA L4')).toBe(121e12);
    expect(peakFlops('Some Future Accelerator')).toBeNull();
  });

  it('skips five warm-up iterations, then smooths 0.9/0.1, and is n/a without a peak', () => {
    const meter = new MfuMeter(1e12, 10e12); // 1 TFLOP per step against a 10 TFLOP/s peak
    for (let i = 0; i < 5; i++) expect(meter.update(i, 100)).toBe(-1);
    expect(meter.update(5, 1000)).toBeCloseTo(0.1);
    expect(meter.update(6, 500)).toBeCloseTo(0.9 * 0.1 + 0.1 * 0.2);
    expect(formatMfu(new MfuMeter(1e12, null).update(10, 100))).toBe('n/a');
    expect(formatMfu(0.1234)).toBe('12.34%');
  });
});
