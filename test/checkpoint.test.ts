import { mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  loadWithEngine,
  readCheckpointInfo,
  readCheckpointVocabulary,
  saveCheckpoint,
  type CheckpointInfo,
} from '../ts/checkpoint.ts';
import { writeFileAtomic } from '../ts/files.ts';

const root = mkdtempSync(join(tmpdir(), 'nanogpt-ckpt-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const info: CheckpointInfo = {
  model_args: { n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, bias: false, vocab_size: 65, dropout: 0 },
  iter_num: 40,
  best_val_loss: 2.5,
  config: { dataset: 'shakespeare_char' },
};
/** A checkpoint file's text, read as the engine would read it. */
const read = (dir: string, file: 'weights' | 'optimizer') => loadWithEngine(dir, file, (path) => readFileSync(path, 'utf8'));
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
    expect(read(dir, 'weights')).toBe('W2');
    expect(read(dir, 'optimizer')).toBe('O2');
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

  it('reads the null that a not-a-number best_val_loss becomes in JSON as no best yet', () => {
    const dir = join(root, 'nan');
    saveCheckpoint(dir, fakeEngine('W', 'O'), { ...info, best_val_loss: Number.NaN });
    expect(readCheckpointInfo(dir).best_val_loss).toBe(Number.POSITIVE_INFINITY);
  });

  it('reports missing weights and an engine that rejects the bytes', () => {
    const dir = join(root, 'partial');
    saveCheckpoint(dir, fakeEngine('W', 'O'), info);
    rmSync(join(dir, 'model.safetensors'));
    expect(() => read(dir, 'weights')).toThrow(/model.safetensors is unusable: the file is missing/);
    expect(() =>
      loadWithEngine(dir, 'optimizer', () => {
        throw new Error('header too large\n  at rust code');
      }),
    ).toThrow(/^cannot load checkpoint .*optimizer.safetensors: header too large$/);
  });

  // A crash inside saveCheckpoint, replayed by writing what it would have left.
  const interruptedSave = (dir: string, stage: 'before commit' | 'while moving') => {
    saveCheckpoint(dir, fakeEngine('W1', 'O1'), info);
    writeFileSync(join(dir, 'model.safetensors.new'), 'W2');
    writeFileSync(join(dir, 'optimizer.safetensors.new'), 'O2');
    if (stage === 'before commit') {
      writeFileSync(join(dir, 'ckpt.json.new.tmp-12345'), '{"model_');
      return;
    }
    writeFileSync(join(dir, 'ckpt.json.new'), JSON.stringify({ ...info, iter_num: 80 }));
    writeFileSync(join(dir, 'save.commit'), '');
    renameSync(join(dir, 'model.safetensors.new'), join(dir, 'model.safetensors'));
  };

  it('keeps the previous checkpoint whole when a save stops before its commit', () => {
    const dir = join(root, 'cut-before-commit');
    interruptedSave(dir, 'before commit');
    expect(readCheckpointInfo(dir).iter_num).toBe(40);
    expect(read(dir, 'weights')).toBe('W1');
    expect(read(dir, 'optimizer')).toBe('O1');
    saveCheckpoint(dir, fakeEngine('W3', 'O3'), { ...info, iter_num: 120 });
    expect(readdirSync(dir).sort()).toEqual(['ckpt.json', 'model.safetensors', 'optimizer.safetensors']);
    expect(read(dir, 'weights')).toBe('W3');
  });

  it('reads a committed save that stopped while moving its files as the new checkpoint, and the next save finishes it', () => {
    const dir = join(root, 'cut-while-moving');
    interruptedSave(dir, 'while moving');
    expect(readCheckpointInfo(dir).iter_num).toBe(80);
    expect(read(dir, 'weights')).toBe('W2');
    expect(read(dir, 'optimizer')).toBe('O2');
    saveCheckpoint(dir, fakeEngine('W3', 'O3'), { ...info, iter_num: 120 });
    expect(readdirSync(dir).sort()).toEqual(['ckpt.json', 'model.safetensors', 'optimizer.safetensors']);
    expect(readCheckpointInfo(dir).iter_num).toBe(120);
    expect(read(dir, 'optimizer')).toBe('O3');
  });

  it('reads a file again where a save running beside the reader has just moved it', () => {
    const dir = join(root, 'moved-under-reader');
    interruptedSave(dir, 'while moving');
    let reads = 0;
    const text = loadWithEngine(dir, 'optimizer', (path) => {
      if (reads++ === 0) {
        renameSync(join(dir, 'optimizer.safetensors.new'), join(dir, 'optimizer.safetensors'));
        rmSync(join(dir, 'save.commit'));
      }
      return readFileSync(path, 'utf8');
    });
    expect([text, reads]).toEqual(['O2', 2]);
  });

  it("keeps the training data's character vocabulary with the checkpoint, and drops it for GPT-2 tokens", () => {
    const dir = join(root, 'vocabulary');
    const vocabulary = { vocab_size: 2, itos: { 0: 'a', 1: 'b' }, stoi: { a: 0, b: 1 } };
    saveCheckpoint(dir, fakeEngine('W', 'O'), info, vocabulary);
    expect(readCheckpointVocabulary(dir)?.meta).toEqual(vocabulary);
    saveCheckpoint(dir, fakeEngine('W', 'O'), info);
    expect(readCheckpointVocabulary(dir)).toBeUndefined();
  });
});
