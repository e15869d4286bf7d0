// `nanogpt-rs serve`: the page that trains a GPT in a browser tab (web/), over node:http. The page's TypeScript is
// bundled with esbuild when the server starts (it imports the browser-safe modules of ts/), and every response
// carries the headers that make the page cross-origin isolated, so the engine's threads can share its memory.
import { existsSync, readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { UserError } from './errors.ts';

export interface ServeOptions {
  host: string;
  /** 0 picks a free port. */
  port: number;
  /** Send COOP/COEP so that the page gets SharedArrayBuffer and threads; without, it trains on one thread. */
  isolated: boolean;
}

const packageRoot = fileURLToPath(new URL('..', import.meta.url));
/** The page's scripts: the UI, the training worker, and one thread of the engine's pool. */
const entryPoints = ['main', 'train-worker', 'thread-worker'];

const contentTypes: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.wasm': 'application/wasm',
  '.txt': 'text/plain; charset=utf-8',
  '.png': 'image/png',
  '.json': 'application/json',
};

/** What the server answers, by URL path: the page, its bundled scripts, the engine, and the bundled text. */
async function routes(): Promise<Map<string, string | Uint8Array>> {
  const page = join(packageRoot, 'web', 'index.html');
  if (!existsSync(page)) throw new UserError(`the browser page is not in this installation (no ${page}); run serve from a clone of the repository`);
  const glue = join(packageRoot, 'wasm', 'web', 'nanogpt.js');
  if (!existsSync(glue)) throw new UserError(`the WebAssembly engine is not built (no ${glue}); run \`npm run build:wasm\` (needs cargo)`);
  // tsx, which runs the CLI, brings esbuild; only this command needs it.
  const { build } = await import('esbuild');
  const bundle = await build({
    entryPoints: Object.fromEntries(entryPoints.map((name) => [name, join(packageRoot, 'web', 'src', `${name}.ts`)])),
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2022',
    outdir: '/app',
    write: false,
    // The engine's glue is served as it is, and imported at run time.
    external: ['/wasm/*'],
    logLevel: 'silent',
  });
  const files = new Map<string, string | Uint8Array>(bundle.outputFiles.map((file) => [file.path, file.contents]));
  files.set('/', readFileSync(page, 'utf8'));
  return files;
}

/** Files served straight from the package: the engine and the Shakespeare text. */
const staticDirs: Record<string, string> = {
  '/wasm/': join(packageRoot, 'wasm'),
  '/data/shakespeare_char/': join(packageRoot, 'data', 'shakespeare_char'),
  '/web/': join(packageRoot, 'web'),
};

function staticFile(urlPath: string): string | undefined {
  for (const [prefix, dir] of Object.entries(staticDirs)) {
    if (!urlPath.startsWith(prefix)) continue;
    const path = normalize(join(dir, decodeURIComponent(urlPath.slice(prefix.length))));
    if (path.startsWith(dir + sep) && existsSync(path)) return path;
  }
  return undefined;
}

/** Starts the server; resolves once it listens, with its address. */
export async function serve(options: ServeOptions): Promise<{ url: string; server: Server }> {
  const files = await routes();
  const isolation = options.isolated
    ? { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp' }
    : {};
  const server = createServer((request, response) => {
    const urlPath = new URL(request.url ?? '/', 'http://localhost').pathname;
    const headers = { ...isolation, 'Cross-Origin-Resource-Policy': 'same-origin', 'Cache-Control': 'no-cache' };
    const bundled = files.get(urlPath);
    const path = bundled === undefined ? staticFile(urlPath) : undefined;
    if (bundled === undefined && path === undefined) {
      response.writeHead(404, { ...headers, 'Content-Type': 'text/plain' }).end(`not found: ${urlPath}`);
      return;
    }
    const type = contentTypes[extname(urlPath === '/' ? 'index.html' : urlPath)] ?? 'application/octet-stream';
    response.writeHead(200, { ...headers, 'Content-Type': type }).end(bundled ?? readFileSync(path!));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(err.code === 'EADDRINUSE' ? new UserError(`port ${options.port} is in use; pick another with --port=N (0 picks a free one)`) : err),
    );
    server.listen(options.port, options.host, resolve);
  });
  const { port } = server.address() as AddressInfo;
  return { url: `http://${options.host}:${port}/`, server };
}
