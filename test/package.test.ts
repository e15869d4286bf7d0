// The npm package as a user without a Rust toolchain gets it: `npm pack`, install the tarball into an empty
// project, then run it through npx from there. cargo, rustc, rustup, napi and wasm-bindgen are shadowed by
// commands that record being called, so any attempt to build from source fails the test.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { npxIn, rustShadow } from './npx.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'nanogpt-package-'));
const project = join(work, 'project');
afterAll(() => rmSync(work, { recursive: true, force: true }));
const { env, called } = rustShadow(work);
const npx = npxIn(project, env);

describe('the packed npm package', () => {
  beforeAll(() => {
    // As `npm pack` does, minus the prepare script's engine builds (the artifacts are built already): prepack
    // compiles dist/ and names the bin in package.json, postpack takes the bin out again.
    execFileSync('npm', ['run', 'prepack'], { cwd: root, stdio: 'pipe' });
    let packed: string;
    try {
      packed = execFileSync('npm', ['pack', '--ignore-scripts', '--pack-destination', work], { cwd: root, encoding: 'utf8', stdio: 'pipe' });
    } finally {
      execFileSync('npm', ['run', 'postpack'], { cwd: root, stdio: 'pipe' });
    }
    const tarball = join(work, packed.trim().split('\n').at(-1)!);
    mkdirSync(project);
    writeFileSync(join(project, 'package.json'), '{ "name": "user-project", "private": true }\n');
    execFileSync('npm', ['install', '--no-audit', '--no-fund', tarball], { cwd: project, env, stdio: 'pipe' });
  }, 240_000);

  it('ships compiled JavaScript, the engines, the configs and the Shakespeare text; no sources', () => {
    const installed = join(project, 'node_modules', 'nanogpt-rs');
    expect(existsSync(join(installed, 'dist', 'cli.js'))).toBe(true);
    expect(existsSync(join(installed, 'dist', 'index.d.ts'))).toBe(true);
    // The engine's types, generated from its Rust structs, that index.d.ts re-exports.
    expect(existsSync(join(installed, 'dist', 'engine-types.d.ts'))).toBe(true);
    expect(readFileSync(join(installed, 'dist', 'engine-types.d.ts'), 'utf8')).toContain('export type ModelArgs');
    expect(existsSync(join(installed, 'dist', 'tokenize-worker.js'))).toBe(true);
    expect(existsSync(join(installed, 'wasm', 'nanogpt_bg.wasm'))).toBe(true);
    expect(existsSync(join(installed, 'wasm', 'nanogpt_relaxed_bg.wasm'))).toBe(true);
    expect(existsSync(join(installed, 'wasm', 'web', 'nanogpt.js'))).toBe(true);
    expect(readdirSync(join(installed, 'native')).some((f) => f.endsWith('.node'))).toBe(true);
    expect(existsSync(join(installed, 'configs', 'train_shakespeare_char.ts'))).toBe(true);
    expect(existsSync(join(installed, 'crates'))).toBe(false);
    expect(existsSync(join(installed, 'ts'))).toBe(false);
    expect(JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')).bin).toEqual({ 'nanogpt-rs': 'bin/nanogpt-rs.js' });
    // The working copy's package.json is back as it was.
    expect(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).bin).toBeUndefined();
  });

  it('an interrupted first npx call leaves the next one working', async () => {
    await npx.interrupted('--help');
    const help = npx.run('--help');
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('Usage: nanogpt-rs');
  });

  it('npx nanogpt-rs --help answers at once, without building, without an npx cache entry', () => {
    const help = npx.run('--help');
    expect(help.stderr).toBe('');
    expect(help.stdout).toContain('Usage: nanogpt-rs');
    expect(help.seconds).toBeLessThan(5);
    expect(existsSync(join(env.npm_config_cache, '_npx'))).toBe(false);
    expect(existsSync(called)).toBe(false);
  });

  it('imports without registering a TypeScript loader, and exports the library API', () => {
    const script = join(project, 'check.mjs');
    writeFileSync(join(project, 'plain.ts'), 'export const x: number = 1;\n');
    writeFileSync(
      script,
      `import { train, sample, estimateMemory, Engine, UserError } from 'nanogpt-rs';
const args = { n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, bias: false, vocab_size: 65, dropout: 0 };
let loader = 'none';
try { await import('./plain.ts'); loader = 'registered'; } catch (err) { loader = err.code; }
console.log(JSON.stringify({ loader, types: [train, sample, estimateMemory, Engine, UserError].map((f) => typeof f), total: estimateMemory(args, 4, 'train').total }));
`,
    );
    const result = JSON.parse(execFileSync(process.execPath, [script], { cwd: project, env, encoding: 'utf8' }));
    expect(result.loader).toBe('ERR_UNKNOWN_FILE_EXTENSION');
    expect(result.types).toEqual(['function', 'function', 'function', 'function', 'function']);
    expect(result.total).toBeGreaterThan(0);
  });

  it("finds configs as nanoGPT users name them, from the user's project", () => {
    for (const name of ['config/train_gpt2.ts', 'configs/train_gpt2.ts', 'train_gpt2']) {
      const result = npx.run('train', name, '--device=cpu');
      expect(result.stdout, name).toContain(`Overriding config with ${name}:`);
      // The config is read; the run then stops at the dataset, which this project does not have.
      expect(result.stderr, name).toBe('error: no data/openwebtext/train.bin: the dataset is not prepared; run `npx nanogpt-rs prepare openwebtext` first\n');
    }
    const missing = npx.run('train', 'config/nope.ts');
    expect(missing.stderr).toMatch(/^error: config file not found: config\/nope\.ts; bundled configs \(usable by name, e\.g\. train_gpt2\): eval_gpt2\.ts, .*train_shakespeare_char\.ts\n$/);
  });

  it('prepares, trains and samples on the cpu with no Rust toolchain', () => {
    const prepared = npx.run('prepare', 'shakespeare_char');
    expect(prepared.stderr).toBe('');
    expect(prepared.stdout).toContain('vocab size: 65');

    const trained = npx.run(
      'train', 'configs/train_shakespeare_char.ts', '--device=cpu', '--compile=False', '--max_iters=20', '--eval_interval=10',
      '--eval_iters=5', '--log_interval=5', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
      '--lr_decay_iters=20', '--warmup_iters=2', '--dropout=0.0',
    );
    expect(trained.stderr).toBe('');
    // Node.js 20 compiles relaxed SIMD once the loader has set its flag; later versions by default.
    expect(trained.stdout).toContain('engine: wasm (relaxed-simd) on cpu');
    expect(trained.stdout).toMatch(/^step 20: train loss [\d.]+, val loss [\d.]+$/m);

    const sampled = npx.run('sample', '--out_dir=out-shakespeare-char', '--num_samples=1', '--max_new_tokens=50');
    expect(sampled.stderr).toBe('');
    expect(sampled.stdout).toContain('---------------');
    expect(existsSync(called)).toBe(false);
  });

  it('tokenizes a corpus on worker threads running the compiled worker', () => {
    const docs = Array.from({ length: 50 }, (_, i) => JSON.stringify({ text: `document ${i} of the corpus` })).join('\n');
    writeFileSync(join(project, 'corpus.jsonl'), `${docs}\n`);
    const result = npx.run('prepare', 'text', '--name=mine', '--workers=2', '--val_fraction=0.1', 'corpus.jsonl');
    expect(result.stderr).toBe('');
    expect(result.stdout).toMatch(/^train has [\d,]+ tokens \(\d+ documents\)$/m);
    expect(existsSync(join(project, 'data', 'mine', 'train.bin'))).toBe(true);
  });
});
