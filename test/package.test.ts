// The npm package as a user without a Rust toolchain gets it: `npm pack`, install the tarball into an empty
// project, then prepare, train and sample on the cpu. cargo, rustc, rustup and wasm-bindgen are shadowed by
// commands that record being called, so any attempt to build from source fails the test.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('..', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'nanogpt-package-'));
const project = join(work, 'project');
const shadow = join(work, 'no-rust');
const called = join(work, 'rust-toolchain-called');
afterAll(() => rmSync(work, { recursive: true, force: true }));

const env = {
  ...process.env,
  PATH: [shadow, process.env.PATH].join(delimiter),
  CARGO_HOME: join(work, 'no-cargo-home'),
  RUSTUP_HOME: join(work, 'no-rustup-home'),
  npm_config_cache: join(work, 'npm-cache'),
};

function npx(...args: string[]) {
  const result = spawnSync('npx', ['--no-install', 'nanogpt-rs', ...args], { cwd: project, env, encoding: 'utf8' });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

describe('the packed npm package', () => {
  let tarball: string;
  beforeAll(() => {
    mkdirSync(shadow);
    for (const tool of ['cargo', 'rustc', 'rustup', 'wasm-bindgen', 'napi']) {
      const path = join(shadow, tool);
      writeFileSync(path, `#!/bin/sh\necho "${tool} $*" >> '${called}'\necho '${tool} is not installed' >&2\nexit 127\n`);
      chmodSync(path, 0o755);
    }
    // The artifacts are built already (npm ci ran the prepare script); packing must not rebuild them.
    const packed = execFileSync('npm', ['pack', '--ignore-scripts', '--pack-destination', work], { cwd: root, encoding: 'utf8', stdio: 'pipe' });
    tarball = join(work, packed.trim().split('\n').at(-1)!);
    mkdirSync(project);
    writeFileSync(join(project, 'package.json'), '{ "name": "user-project", "private": true }\n');
    execFileSync('npm', ['install', '--no-audit', '--no-fund', tarball], { cwd: project, env, stdio: 'pipe' });
  }, 240_000);

  it('ships the WebAssembly engine, the native addon, the configs and the Shakespeare text', () => {
    const installed = join(project, 'node_modules', 'nanogpt-rs');
    expect(existsSync(join(installed, 'wasm', 'nanogpt_bg.wasm'))).toBe(true);
    expect(existsSync(join(installed, 'wasm', 'web', 'nanogpt.js'))).toBe(true);
    expect(readdirSync(join(installed, 'native')).some((f) => f.endsWith('.node'))).toBe(true);
    expect(existsSync(join(installed, 'configs', 'train_shakespeare_char.ts'))).toBe(true);
    expect(existsSync(join(installed, 'crates'))).toBe(false);
  });

  it('prepares, trains and samples on the cpu with no Rust toolchain', () => {
    const prepared = npx('prepare', 'shakespeare_char');
    expect(prepared.stderr).toBe('');
    expect(prepared.stdout).toContain('vocab size: 65');

    const trained = npx(
      'train', 'configs/train_shakespeare_char.ts', '--device=cpu', '--compile=False', '--max_iters=20', '--eval_interval=10',
      '--eval_iters=5', '--log_interval=5', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=8',
      '--lr_decay_iters=20', '--warmup_iters=2', '--dropout=0.0',
    );
    expect(trained.stderr).toBe('');
    expect(trained.stdout).toContain('engine: wasm on cpu');
    expect(trained.stdout).toMatch(/^step 20: train loss [\d.]+, val loss [\d.]+$/m);

    const sampled = npx('sample', '--out_dir=out-shakespeare-char', '--num_samples=1', '--max_new_tokens=50');
    expect(sampled.stderr).toBe('');
    expect(sampled.stdout).toContain('---------------');
    expect(existsSync(called)).toBe(false);
  });
});
