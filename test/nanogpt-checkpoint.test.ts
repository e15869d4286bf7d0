// nanoGPT's own out_dir (ckpt.pt) and dataset (meta.pkl, no meta.json) through the CLI: sample, resume, export back
// to ckpt.pt. The checkpoints come from nanoGPT's train.py (test/fixtures/nanogpt/make_fixtures.py). Runs the
// native engine (`npm run build:native`) and the WebAssembly engine (`npm run build:wasm`).
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readCheckpointInfo, readMetaPkl } from '../ts/checkpoint.ts';
import { Engine } from '../ts/engine.ts';

const cli = fileURLToPath(new URL('../bin/nanogpt-rs.js', import.meta.url));
const fixtures = fileURLToPath(new URL('./fixtures/nanogpt/', import.meta.url));
const expected = JSON.parse(readFileSync(join(fixtures, 'expected.json'), 'utf8'));
const work = mkdtempSync(join(tmpdir(), 'nanogpt-torch-ckpt-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

function run(...args: string[]) {
  const result = spawnSync(process.execPath, [cli, ...args], { cwd: work, encoding: 'utf8' });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

const hasTorch = spawnSync('python3', ['-c', 'import torch']).status === 0;
const vocabSize: number = expected.plain.model_args.vocab_size;

beforeAll(() => {
  // nanoGPT's layout: out-nanogpt/ckpt.pt, and data/shakespeare_char/ with meta.pkl but no meta.json.
  mkdirSync(join(work, 'out-nanogpt'));
  copyFileSync(join(fixtures, 'plain', 'ckpt.pt'), join(work, 'out-nanogpt', 'ckpt.pt'));
  const data = join(work, 'data', 'shakespeare_char');
  mkdirSync(data, { recursive: true });
  copyFileSync(join(fixtures, 'plain', 'meta.pkl'), join(data, 'meta.pkl'));
  const tokens = (n: number) => Buffer.from(Uint16Array.from({ length: n }, (_, i) => (i * 7919) % vocabSize).buffer);
  writeFileSync(join(data, 'train.bin'), tokens(4000));
  writeFileSync(join(data, 'val.bin'), tokens(1000));
});

describe("nanoGPT's ckpt.pt", () => {
  it("reads the run's info and the meta.pkl vocabulary through the engine", () => {
    const info = readCheckpointInfo(join(work, 'out-nanogpt'));
    expect(info).toMatchObject({ iter_num: expected.plain.iter_num, model_args: { n_layer: 2, n_embd: 16, vocab_size: vocabSize } });
    expect(info.config.dataset).toBe('shakespeare_char');
    const meta = readMetaPkl(join(work, 'data', 'shakespeare_char'));
    expect(meta?.vocab_size).toBe(vocabSize);
    expect(meta?.itos['0']).toBe('\n');
  });

  it.each(['native', 'wasm'])('samples from it with the meta.pkl vocabulary (%s engine)', (engine) => {
    const result = run('sample', '--out_dir=out-nanogpt', '--device=cpu', `--engine=${engine}`, '--num_samples=2', '--max_new_tokens=30', '--start=the ');
    expect(result.stderr).toBe('');
    expect(result.status).toBe(0);
    expect(result.stdout).toContain(`Loading meta from ${join('data', 'shakespeare_char', 'meta.pkl')}`);
    expect(result.stdout.split('---------------').length).toBe(3);
    expect(result.stdout).toContain('the ');
  });

  it('resumes training from it, at its iteration', () => {
    const result = run(
      'train', '--init_from=resume', '--out_dir=out-nanogpt', '--dataset=shakespeare_char', '--device=cpu', '--engine=native',
      '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=24', '--eval_interval=4',
      '--eval_iters=2', '--log_interval=1', '--warmup_iters=5', '--lr_decay_iters=40', '--learning_rate=1e-2', '--min_lr=1e-3',
    );
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout).toContain('Resuming training from out-nanogpt');
    expect(result.stdout).toContain('step 20:');
    expect(result.stdout).not.toContain('step 16:');
    // The run saved its own checkpoint beside nanoGPT's, which the next resume takes.
    expect(readCheckpointInfo(join(work, 'out-nanogpt')).iter_num).toBe(24);
  });

  const windows = expected.plain.windows;
  const windowLoss = (engine: Engine) => engine.evalLoss(Uint32Array.from(windows.x), Int32Array.from(windows.y), windows.batch_size);

  it('exports the resumed run to ckpt.pt, which reads back to the same model and info', () => {
    const result = run('export', '--out_dir=out-nanogpt', '--to=nanogpt', '--out=exported/ckpt.pt');
    expect(result.status, result.stderr).toBe(0);
    const info = readCheckpointInfo(join(work, 'exported'));
    expect(info.iter_num).toBe(24);
    const exported = Engine.fromNanogptCheckpointFile(info.model_args, join(work, 'exported', 'ckpt.pt'), 'cpu', 'native');
    const resumed = Engine.fromSafetensorsFile(info.model_args, join(work, 'out-nanogpt', 'model.safetensors'), 'cpu', 'native');
    expect(windowLoss(exported)).toBe(windowLoss(resumed));
  });

  it.skipIf(!hasTorch)('the exported ckpt.pt loads in PyTorch as nanoGPT loads it, with the same loss (python3 with torch)', () => {
    const path = join(work, 'exported', 'ckpt.pt');
    const casePath = join(work, 'case.json');
    writeFileSync(casePath, JSON.stringify({ windows, resume: { ...expected.plain.resume, batches: [], lrs: [] } }));
    const check = spawnSync('python3', [join(fixtures, 'check_export.py'), path, casePath], { encoding: 'utf8' });
    expect(check.status, check.stderr).toBe(0);
    const torch = JSON.parse(check.stdout);
    expect(torch.iter_num).toBe(24);
    const ours = windowLoss(Engine.fromNanogptCheckpointFile(readCheckpointInfo(join(work, 'exported')).model_args, path, 'cpu', 'native'));
    expect(Math.abs(torch.val_loss - ours)).toBeLessThan(1e-5);
  });

  it('refuses a ckpt.pt whose pickle would run code, naming the call, and runs nothing', () => {
    const marker = '/tmp/nanogpt-rs-pickle-payload-ran';
    rmSync(marker, { force: true });
    mkdirSync(join(work, 'out-malicious'));
    copyFileSync(join(fixtures, 'malicious', 'ckpt.pt'), join(work, 'out-malicious', 'ckpt.pt'));
    const result = run('sample', '--out_dir=out-malicious', '--device=cpu', '--engine=native');
    expect(result.status).toBe(1);
    expect(result.stderr).toMatch(/^error: checkpoint .*ckpt\.pt is unusable: refusing the pickle: it calls `posix\.system`.*\n$/);
    expect(existsSync(marker)).toBe(false);
  });

  it('reports a truncated ckpt.pt in one line', () => {
    mkdirSync(join(work, 'out-truncated'));
    const bytes = readFileSync(join(fixtures, 'plain', 'ckpt.pt'));
    writeFileSync(join(work, 'out-truncated', 'ckpt.pt'), bytes.subarray(0, bytes.length >> 1));
    const result = run('sample', '--out_dir=out-truncated', '--device=cpu', '--engine=native');
    expect(result.status).toBe(1);
    expect(result.stderr).toMatch(/^error: checkpoint .*ckpt\.pt is unusable: not a readable PyTorch checkpoint: .*\n$/);
  });
});
