// Running `npx nanogpt-rs` the way a user does, for the package and clone tests: the Rust toolchain shadowed by
// commands that record being called, a private npm cache, and timing.
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';

export function rustShadow(work: string): { env: NodeJS.ProcessEnv & { npm_config_cache: string }; called: string } {
  const shadow = join(work, 'no-rust');
  const called = join(work, 'rust-toolchain-called');
  mkdirSync(shadow, { recursive: true });
  for (const tool of ['cargo', 'rustc', 'rustup', 'wasm-bindgen', 'napi']) {
    const path = join(shadow, tool);
    writeFileSync(path, `#!/bin/sh\necho "${tool} $*" >> '${called}'\necho '${tool} is not installed' >&2\nexit 127\n`);
    chmodSync(path, 0o755);
  }
  const env = {
    ...process.env,
    PATH: [shadow, process.env.PATH].join(delimiter),
    CARGO_HOME: join(work, 'no-cargo-home'),
    RUSTUP_HOME: join(work, 'no-rustup-home'),
    npm_config_cache: join(work, 'npm-cache'),
  };
  return { env, called };
}

export function npxIn(cwd: string, env: NodeJS.ProcessEnv) {
  return {
    run(...args: string[]) {
      const started = performance.now();
      const result = spawnSync('npx', ['nanogpt-rs', ...args], { cwd, env, encoding: 'utf8' });
      return { status: result.status, stdout: result.stdout, stderr: result.stderr, seconds: (performance.now() - started) / 1000 };
    },
    /** Starts `npx nanogpt-rs ...` and kills it (as Ctrl-C does) 200 ms in, before it can finish. */
    interrupted(...args: string[]): Promise<void> {
      return new Promise((resolve) => {
        const child = spawn('npx', ['nanogpt-rs', ...args], { cwd, env, stdio: 'ignore', detached: true });
        setTimeout(() => process.kill(-child.pid!, 'SIGINT'), 200);
        child.on('close', () => resolve());
      });
    },
  };
}
