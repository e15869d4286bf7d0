import { mkdtempSync, readFileSync, appendFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { plot } from '../ts/plot.ts';
import { latestRun, RunLog, readRunLog, updateRatiosByLayer, type LogRecord } from '../ts/telemetry.ts';

const tempDir = () => mkdtempSync(join(tmpdir(), 'nanogpt-telemetry-'));
const start = { init_from: 'scratch', iter: 0 };

describe('run log', () => {
  it('groups update ratios by layer, keeping the largest', () => {
    const byLayer = updateRatiosByLayer([
      ['transformer.wte.weight', 1e-3],
      ['transformer.h.0.ln_1.weight', 2e-4],
      ['transformer.h.0.attn.c_attn.weight', 5e-3],
      ['transformer.h.11.mlp.c_proj.weight', 7e-4],
      ['transformer.ln_f.weight', 3e-4],
    ]);
    expect(byLayer).toEqual({ wte: 1e-3, 'h.0': 5e-3, 'h.11': 7e-4, ln_f: 3e-4 });
  });

  it('appends train and eval records with the clip fraction, and reads them back', async () => {
    const outDir = tempDir();
    const notices: string[] = [];
    const log = await RunLog.open({ outDir, start, notice: (l) => notices.push(l) });
    log.countStep(true);
    log.countStep(false);
    log.countStep(false);
    log.countStep(true);
    log.train({ iter: 3, loss: 2.5, lr: 1e-3, grad_norm: 1.7, clipped: true, tokens_per_s: 1234, mfu: null, update_ratio: { 'h.0': 1e-3 } });
    log.eval({ iter: 4, train_loss: 2.4, val_loss: 2.6, lr: 1e-3 }, null);
    await log.close();
    // A line cut short by a crash does not hide the complete ones.
    appendFileSync(log.path, '{"kind":"train","iter":5,"lo');
    const records = readRunLog(outDir);
    expect(records).toHaveLength(3);
    expect(records.shift()).toMatchObject({ kind: 'run', init_from: 'scratch', iter: 0 });
    expect(records[0]).toMatchObject({ kind: 'train', iter: 3, loss: 2.5, grad_norm: 1.7, clipped: true, clip_fraction: 0.5, update_ratio: { 'h.0': 1e-3 } });
    expect(records[1]).toMatchObject({ kind: 'eval', iter: 4, train_loss: 2.4, val_loss: 2.6 });
    expect(notices).toEqual([]);
  });

  it('says once that wandb is off without an API key, and keeps the local log', async () => {
    const saved = process.env.WANDB_API_KEY;
    delete process.env.WANDB_API_KEY;
    try {
      const notices: string[] = [];
      const outDir = tempDir();
      const log = await RunLog.open({ outDir, start, wandb: { project: 'p', runName: 'r', config: {} }, notice: (l) => notices.push(l) });
      log.eval({ iter: 0, train_loss: 4, val_loss: 4, lr: 0 }, null);
      log.eval({ iter: 1, train_loss: 3, val_loss: 3, lr: 0 }, null);
      await log.close();
      expect(notices).toHaveLength(1);
      expect(notices[0]).toMatch(/WANDB_API_KEY is not set/);
      expect(readRunLog(outDir)).toHaveLength(3);
    } finally {
      if (saved !== undefined) process.env.WANDB_API_KEY = saved;
    }
  });
  it('leaves the log as it was for a run that records nothing', async () => {
    const outDir = tempDir();
    const log = await RunLog.open({ outDir, start, notice: () => {} });
    await log.close();
    expect(readRunLog(outDir)).toEqual([]);
  });

  it('keeps the records of the latest run and of the runs it resumed', () => {
    const run = (init_from: string, iter: number): LogRecord => ({ kind: 'run', init_from, iter, time: '' });
    const train = (iter: number, loss: number): LogRecord => ({ kind: 'train', iter, loss, lr: 0, grad_norm: 0, clipped: false, clip_fraction: 0, tokens_per_s: 0, mfu: null, update_ratio: {}, time: '' });
    const losses = (records: LogRecord[]) => records.map((r) => (r.kind === 'train' ? [r.iter, r.loss] : r.kind));
    const log = [
      train(0, 9), // from before runs were recorded
      run('scratch', 0), train(0, 1), train(10, 1), train(20, 1), train(30, 1),
      run('resume', 20), train(20, 2), train(40, 2),
      run('resume', 30), train(30, 3),
    ];
    expect(losses(latestRun(log))).toEqual([[0, 1], [10, 1], [20, 2], [30, 3]]);
    expect(losses(latestRun([...log, run('gpt2', 0), train(0, 4)]))).toEqual([[0, 4]]);
    expect(losses(latestRun(log.slice(0, 1)))).toEqual([[0, 9]]);
  });
});

describe('plot', () => {
  it('renders the loss, lr and grad-norm curves of a log into one HTML page', async () => {
    const outDir = tempDir();
    const log = await RunLog.open({ outDir, start, notice: () => {} });
    for (let iter = 0; iter <= 100; iter++) {
      log.countStep(false);
      log.train({ iter, loss: 4 - iter / 50, lr: 1e-3 * Math.min(1, (iter + 1) / 10), grad_norm: 1, clipped: false, tokens_per_s: 1, mfu: null, update_ratio: {} });
      if (iter % 50 === 0) log.eval({ iter, train_loss: 4 - iter / 50, val_loss: 4.1 - iter / 60, lr: 1e-3 }, null);
    }
    await log.close();
    const file = plot(outDir);
    const html = readFileSync(file, 'utf8');
    expect(html).toContain('<svg');
    expect(html.match(/<svg/g)).toHaveLength(3);
    expect(html).toContain('best val loss 2.4333 at iteration 100');
    expect(html.match(/<circle/g)).toHaveLength(6); // 3 evaluations x (train, val)
  });

  it('fails with a one-line error when there is no log', () => {
    expect(() => plot(tempDir())).toThrow(/no training records in .*log\.jsonl; train with --out_dir=/);
  });
});
