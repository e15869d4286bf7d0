#!/usr/bin/env node
// The CLI, compiled from ts/cli.ts into dist/ by `npm run build` (part of `npm install` and `npm pack`).
import { existsSync } from 'node:fs';

const cli = new URL('../dist/cli.js', import.meta.url);
if (!existsSync(cli)) {
  console.error('error: the CLI is not built (no dist/cli.js); run `npm run build` in the nanogpt-rs folder');
  process.exit(1);
}
await import(cli.href);
