import { describe, expect, it } from 'vitest';
import { Progress } from '../ts/progress.ts';

function fakeStream(isTTY: boolean) {
  const writes: string[] = [];
  return { writes, stream: { isTTY, write: (text: string) => writes.push(text) > 0 } };
}

describe('Progress', () => {
  it("prints nanoGPT's plain lines when not on a terminal", () => {
    const { writes, stream } = fakeStream(false);
    const progress = new Progress(stream, 10);
    progress.print('step 0: train loss 4.1700, val loss 4.1700');
    progress.log('iter 0: loss 4.1700, time 12.00ms, mfu n/a');
    progress.update(0, 4.17);
    progress.finish();
    expect(writes.join('')).toBe('step 0: train loss 4.1700, val loss 4.1700\niter 0: loss 4.1700, time 12.00ms, mfu n/a\n');
  });

  it('redraws one bar on a terminal and keeps lasting lines above it', () => {
    const { writes, stream } = fakeStream(true);
    const progress = new Progress(stream, 10);
    progress.log('iter 0: loss 4.1700, time 12.00ms, mfu n/a');
    progress.update(10, 2.5);
    progress.print('saving checkpoint to out');
    progress.finish();
    const output = writes.join('');
    expect(output).not.toContain('iter 0: loss');
    expect(output).toMatch(/^\r\x1b\[2Kiter 10\/10 █{20} [\d.]+ it\/s, loss 2\.5000, ETA 0:00\r\x1b\[2Ksaving checkpoint to out\niter 10\/10 .*\n$/);
  });
});
