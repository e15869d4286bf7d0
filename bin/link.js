// Links the CLI into this folder's own node_modules/.bin, run by `npm run build` (so by `npm install` in a clone).
// `npx nanogpt-rs` then finds it there and runs it at once. package.json names no `bin` (`prepack` adds it to the
// packed copy only), because npx installs a folder whose package.json names the command into its own cache, running
// its prepare script (both engine builds) on the first call.
import { mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const binDir = fileURLToPath(new URL('../node_modules/.bin/', import.meta.url));
const link = `${binDir}nanogpt-rs`;
mkdirSync(binDir, { recursive: true });
rmSync(link, { force: true });
symlinkSync('../../bin/nanogpt-rs.js', link);
