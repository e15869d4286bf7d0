// `npx nanogpt-rs` inside a fresh clone runs the clone's own CLI at once: `npm install` (its prepare script's
// `npm run build`) links it into node_modules/.bin, where npx looks, so no call installs anything into npx's cache
// or runs a lifecycle script. The engines are copied in rather than rebuilt; the Rust toolchain is shadowed.
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, renameSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { npxIn, rustShadow } from './npx.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'nanogpt-clone-'));
const clone = join(work, 'clone');
afterAll(() => rmSync(work, { recursive: true, force: true }));
const { env, called } = rustShadow(work);
const npx = npxIn(clone, env);

describe('npx nanogpt-rs in a fresh clone', () => {
  beforeAll(() => {
    execFileSync('git', ['clone', '--quiet', root, clone], { stdio: 'pipe' });
    for (const built of ['node_modules', 'native', 'wasm']) {
      cpSync(join(root, built), join(clone, built), { recursive: true, verbatimSymlinks: true, filter: (src) => !src.endsWith(join('.bin', 'nanogpt-rs')) });
    }
    expect(existsSync(join(clone, 'node_modules', '.bin', 'nanogpt-rs'))).toBe(false);
    execFileSync('npm', ['run', 'build'], { cwd: clone, env, stdio: 'pipe' });
  }, 240_000);

  it('an interrupted first call leaves the next one working', async () => {
    await npx.interrupted('--help');
    const help = npx.run('--help');
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('Usage: nanogpt-rs');
  });

  it('runs the local CLI at once: no build, no npx cache entry', () => {
    const help = npx.run('--help');
    expect(help.stderr).toBe('');
    expect(help.stdout).toContain('Usage: nanogpt-rs');
    expect(help.seconds).toBeLessThan(5);
    expect(existsSync(join(env.npm_config_cache, '_npx'))).toBe(false);
    expect(existsSync(called)).toBe(false);
  });

  it("keeps the README's config paths working, and nanoGPT's config/ folder name", () => {
    for (const name of ['configs/train_shakespeare_char.ts', 'config/train_gpt2.ts']) {
      const result = npx.run('train', name, '--device=cpu', '--dataset=none');
      expect(result.stdout, name).toContain(`Overriding config with ${name}:`);
      expect(result.stderr, name).toBe('error: no data/none/train.bin: the dataset is not prepared; run `npx nanogpt-rs prepare text --name=none FILE...` first\n');
    }
  });

  it('names a misspelt device before an engine build that is missing', () => {
    const native = join(clone, 'native');
    renameSync(native, `${native}.away`);
    try {
      const misspelt = npx.run('train', '--device=gpu', '--dataset=none');
      expect(misspelt.stderr).toBe('error: unknown device `gpu`: use cpu, cuda or cuda:N\n');
      const unbuilt = npx.run('train', '--device=cuda', '--dataset=none');
      expect(unbuilt.stderr).toMatch(/^error: the CUDA engine is not built \(no \.node file in .*\); run `npm run build:cuda`/);
    } finally {
      renameSync(`${native}.away`, native);
    }
  });

  it('says in one line when an engine build is older than the Rust sources, and does not rebuild it', () => {
    const future = new Date(Date.now() + 3600_000);
    utimesSync(join(clone, 'crates', 'nanogpt-core', 'src', 'sample.rs'), future, future);
    const result = npx.run('bench', '--device=cpu', '--engine=native', '--dtype=float32', '--warmup=0', '--iters=1', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=1', '--vocab_size=65');
    expect(result.stderr).toMatch(/^warning: native\/nanogpt\.[\w-]+\.node is older than the Rust sources in crates\/; run `npm run build:native` to rebuild it\n$/);
    expect(result.stdout).toMatch(/^RESULT /m);
    expect(existsSync(called)).toBe(false);
  });
});
