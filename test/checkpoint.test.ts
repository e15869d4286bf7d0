import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadWithEngine, optimizerStatePath, readCheckpointInfo, saveCheckpoint, weightsPath, type CheckpointInfo } from '../ts/checkpoint.ts';
import { writeFileAtomic } from '../ts/files.ts';

const root = mkdtempSync(join(tmpdir(), 'nanogpt-ckpt-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const info: CheckpointInfo = {
  model_args: { n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, bias: false, vocab_size: 65, dropout: 0 },
  iter_num: 40,
  best_val_loss: 2.5,
  config: { dataset: 'shakespeare_char' },
};
const fakeEngine = (weights: string, optimizer: string) => ({
  saveWeightsFile: (path: string) => writeFileSync(path, weights),
  saveOptimizerFile: (path: string) => writeFileSync(path, optimizer),
});

describe('writeFileAtomic', () => {
  it('replaces the file whole and leaves no temporary file behind', () => {
    const dir = mkdtempSync(join(root, 'atomic-'));
    const path = join(dir, 'f.bin');
    writeFileAtomic(path, 'old');
    writeFileAtomic(path, Buffer.from('new contents'));
    expect(readFileSync(path, 'utf8')).toBe('new contents');
    expect(readdirSync(dir)).toEqual(['f.bin']);
  });

  it('cleans up its temporary file when the final rename fails', () => {
    const dir = mkdtempSync(join(root, 'atomic-'));
    const target = join(dir, 'taken');
    mkdirSync(target);
    writeFileSync(join(target, 'inside'), 'x');
    expect(() => writeFileAtomic(target, 'new')).toThrow();
    expect(readdirSync(dir)).toEqual(['taken']);
  });
});

describe('saveCheckpoint / readCheckpointInfo', () => {
  it('writes the three files and reads them back', () => {
    const dir = join(root, 'out');
    saveCheckpoint(dir, fakeEngine('W1', 'O1'), info);
    saveCheckpoint(dir, fakeEngine('W2', 'O2'), { ...info, iter_num: 80 });
    expect(readdirSync(dir).sort()).toEqual(['ckpt.json', 'model.safetensors', 'optimizer.safetensors']);
    expect(readCheckpointInfo(dir)).toEqual({ ...info, iter_num: 80 });
    expect(readFileSync(weightsPath(dir), 'utf8')).toBe('W2');
    expect(readFileSync(optimizerStatePath(dir), 'utf8')).toBe('O2');
  });

  it('says there is no checkpoint when ckpt.json is missing', () => {
    expect(() => readCheckpointInfo(join(root, 'nothing'))).toThrow(/^no checkpoint in .*nothing \(ckpt.json is missing\)/);
  });

  it('reports a corrupt ckpt.json in one line', () => {
    const dir = join(root, 'corrupt');
    saveCheckpoint(dir, fakeEngine('W', 'O'), info);
    writeFileSync(join(dir, 'ckpt.json'), '{"model_args": {');
    const error = (() => {
      try {
        readCheckpointInfo(dir);
      } catch (err) {
        return err as Error;
      }
    })();
    expect(error?.message).toMatch(/^checkpoint .*ckpt.json is unusable: .*JSON/);
    expect(error?.message).not.toContain('\n');
    writeFileSync(join(dir, 'ckpt.json'), JSON.stringify({ ...info, model_args: { n_layer: 2 } }));
    expect(() => readCheckpointInfo(dir)).toThrow('model_args.n_head is missing');
  });

  it('reports missing weights and an engine that rejects the bytes', () => {
    const dir = join(root, 'partial');
    saveCheckpoint(dir, fakeEngine('W', 'O'), info);
    rmSync(join(dir, 'model.safetensors'));
    expect(() => weightsPath(dir)).toThrow(/model.safetensors is unusable: the file is missing/);
    expect(() =>
      loadWithEngine(dir, 'optimizer', () => {
        throw new Error('header too large\n  at rust code');
      }),
    ).toThrow(/^cannot load checkpoint .*optimizer.safetensors: header too large$/);
  });
});
