/// <reference lib="dom" />
// The training page (web/, served by `nanogpt-rs serve`) in a real browser: Debian's Chromium, driven headless by
// playwright-core (which downloads nothing). Without a Chromium (`apt-get install -y chromium`, or CHROMIUM_PATH)
// the tests report themselves skipped.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unzip } from '../web/src/zip.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const cli = join(root, 'bin', 'nanogpt-rs.js');
const chromiumPath = [process.env.CHROMIUM_PATH, '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((path) => path && existsSync(path));
/** Working folder of the CLI runs; the screenshot goes to NANOGPT_SCREENSHOT (web/screenshot.png is the README's), else here. */
const work = mkdtempSync(join(tmpdir(), 'nanogpt-browser-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Starts `nanogpt-rs serve` on a free port and resolves with its URL. */
function startServer(...args: string[]): Promise<{ url: string; server: ChildProcess }> {
  const server = spawn(process.execPath, [cli, 'serve', '--port=0', ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let output = '';
    server.stdout!.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      const url = /serving the training page at (\S+)/.exec(output)?.[1];
      if (url) resolve({ url, server });
    });
    server.once('exit', (code) => reject(new Error(`nanogpt-rs serve exited with ${code}: ${output}`)));
  });
}

function runCli(args: string[], env: Record<string, string> = {}): string {
  const result = spawnSync(process.execPath, [cli, ...args], { cwd: work, encoding: 'utf8', env: { ...process.env, ...env } });
  expect(result.status, result.stderr).toBe(0);
  return result.stdout;
}

/** The page's record of the run (set by web/src/main.ts). */
interface PageHistory {
  threads: number;
  iters: Array<{ iter: number; loss: number; stepMs: number }>;
  evals: Array<{ iter: number; train: number; val: number }>;
  samples: string[];
  state: string;
}
const history = (page: Page) => page.evaluate(() => (globalThis as unknown as { nanogptPage: PageHistory }).nanogptPage);

async function openPage(browser: Browser, url: string): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 }, acceptDownloads: true });
  page.on('pageerror', (err) => console.error(`page error: ${err.message}`));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById('status')?.textContent === 'ready' || document.getElementById('status')?.classList.contains('error'), null, { timeout: 60_000 });
  expect(await page.textContent('#status')).toBe('ready');
  return page;
}

async function setKeys(page: Page, keys: Record<string, number>): Promise<void> {
  for (const [key, value] of Object.entries(keys)) await page.fill(`#key-${key}`, String(value));
}

/** Clicks a button, does `whileTraining` once the run has started, and waits up to `timeout` ms for the run to end. */
async function trainUntilStopped(page: Page, button: '#train' | '#reset', whileTraining?: () => Promise<void>, timeout = 240_000): Promise<PageHistory> {
  await page.click(button);
  await page.waitForFunction(() => (globalThis as unknown as { nanogptPage: PageHistory }).nanogptPage.state === 'training');
  await whileTraining?.();
  await page.waitForFunction(() => (globalThis as unknown as { nanogptPage: PageHistory }).nanogptPage.state !== 'training', null, { timeout });
  return history(page);
}

/** Waits for the page to show an error, and returns it (cleared, so that the next one is waited for). */
async function errorShown(page: Page): Promise<string | null> {
  await page.waitForFunction(() => document.getElementById('status')!.classList.contains('error'));
  const text = await page.textContent('#status');
  await page.evaluate(() => document.getElementById('status')!.classList.remove('error'));
  return text;
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];

describe.skipIf(!chromiumPath)('the training page in Chromium', () => {
  let browser: Browser;
  const servers: ChildProcess[] = [];
  let isolatedUrl = '';

  beforeAll(async () => {
    browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
    const isolated = await startServer();
    servers.push(isolated.server);
    isolatedUrl = isolated.url;
  });
  afterAll(async () => {
    await browser?.close();
    for (const server of servers) server.kill();
  });

  it('is cross-origin isolated, runs the engine on one thread per core, trains 50 iterations with falling loss, samples, and its checkpoint loads in the CLI', async () => {
    const page = await openPage(browser, isolatedUrl);
    const { isolated, cores } = await page.evaluate(() => ({ isolated: crossOriginIsolated, cores: navigator.hardwareConcurrency }));
    expect(isolated).toBe(true);
    expect((await history(page)).threads).toBe(cores);

    await setKeys(page, { max_iters: 50, eval_interval: 25 });
    const run = await trainUntilStopped(page, '#reset');
    expect(await page.textContent('#status')).toBe('finished at iteration 50');
    expect(run.iters.map((i) => i.iter)).toEqual(Array.from({ length: 51 }, (_, i) => i));
    expect(run.evals.map((e) => e.iter)).toEqual([0, 25, 50]);
    const first = run.iters.slice(0, 5).reduce((s, i) => s + i.loss, 0) / 5;
    const last = run.iters.slice(-5).reduce((s, i) => s + i.loss, 0) / 5;
    expect(last).toBeLessThan(first - 0.5);
    expect(run.evals[2].val).toBeLessThan(run.evals[0].val - 0.5);
    expect(run.samples.length).toBe(2); // at the evaluations of iterations 25 and 50
    console.log(`page, ${run.threads} threads: ${(1000 / median(run.iters.map((i) => i.stepMs))).toFixed(2)} iterations/s (median step)`);

    await page.fill('#prompt', 'ROMEO:');
    await page.click('#sample');
    await page.waitForFunction(() => (globalThis as unknown as { nanogptPage: PageHistory }).nanogptPage.samples.length === 3);
    const sampled = (await history(page)).samples[2];
    expect(sampled.startsWith('ROMEO:')).toBe(true);
    expect(sampled.length).toBe('ROMEO:'.length + 500);
    await page.screenshot({ path: process.env.NANOGPT_SCREENSHOT ?? join(work, 'screenshot.png'), fullPage: true });

    // The checkpoint, downloaded as the CLI's folder, samples with the CLI.
    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
    expect(download.suggestedFilename()).toBe('out-shakespeare-char.zip');
    const zipPath = join(work, 'page.zip');
    await download.saveAs(zipPath);
    const entries = unzip(readFileSync(zipPath));
    expect(entries.map((e) => e.name).sort()).toEqual(
      ['ckpt.json', 'meta.json', 'model.safetensors', 'optimizer.safetensors'].map((f) => `out-shakespeare-char/${f}`),
    );
    for (const { name, bytes } of entries) {
      mkdirSync(join(work, dirname(name)), { recursive: true });
      writeFileSync(join(work, name), bytes);
    }
    const info = JSON.parse(readFileSync(join(work, 'out-shakespeare-char', 'ckpt.json'), 'utf8'));
    expect(info.iter_num).toBe(51);
    expect(info.model_args).toMatchObject({ n_layer: 4, n_head: 4, n_embd: 128, block_size: 64, vocab_size: 65 });
    const printed = runCli(['sample', '--out_dir=out-shakespeare-char', '--device=cpu', '--start=ROMEO:', '--num_samples=1', '--max_new_tokens=40']);
    expect(printed).toContain(`Loading meta from ${join('out-shakespeare-char', 'meta.json')}`);
    expect(printed).toMatch(/^ROMEO:[\s\S]{40}\n-+$/m);

    // The page reads its own zip back.
    await page.setInputFiles('#checkpoint-files', zipPath);
    await page.waitForFunction(() => document.getElementById('status')!.textContent!.startsWith('loaded'));
    expect(await page.textContent('#status')).toBe('loaded a checkpoint at iteration 51 (best val loss ' + Math.min(...run.evals.map((e) => e.val)).toFixed(4) + '); Train resumes it');

    // The CLI resumes it; the page loads the CLI's checkpoint (no meta.json: the page's text has the vocabulary)
    // and resumes it in turn.
    runCli(['prepare', 'shakespeare_char']);
    runCli(['train', 'configs/train_shakespeare_char.ts', '--init_from=resume', '--device=cpu', '--block_size=64', '--dropout=0.0',
      '--max_iters=55', '--eval_interval=5', '--eval_iters=2', '--always_save_checkpoint=True']);
    const cliInfo = JSON.parse(readFileSync(join(work, 'out-shakespeare-char', 'ckpt.json'), 'utf8'));
    expect(cliInfo.iter_num).toBe(55);
    await page.setInputFiles('#checkpoint-files', ['ckpt.json', 'model.safetensors', 'optimizer.safetensors'].map((f) => join(work, 'out-shakespeare-char', f)));
    await page.waitForFunction(() => /^loaded a checkpoint at iteration 55 .*; Train resumes it$/.test(document.getElementById('status')!.textContent!));
    await setKeys(page, { max_iters: 60 });
    const resumed = await trainUntilStopped(page, '#train');
    expect(resumed.iters.map((i) => i.iter)).toEqual([55, 56, 57, 58, 59, 60]);
    expect(resumed.iters.at(-1)!.loss).toBeLessThan(first - 0.5);

    // The CLI, resuming the same checkpoint with the page's settings (its form's, with lr_decay_iters following
    // max_iters), takes the same steps: the two loops draw the same batches and learning rates.
    cpSync(join(work, 'out-shakespeare-char'), join(work, 'out-cli-continued'), { recursive: true });
    const continued = runCli(['train', 'configs/train_shakespeare_char.ts', '--init_from=resume', '--out_dir=out-cli-continued', '--device=cpu',
      '--block_size=64', '--dropout=0.0', '--batch_size=12', '--max_iters=60', '--lr_decay_iters=60', '--log_interval=1', '--eval_interval=25']);
    const cliLosses = [...continued.matchAll(/^iter (\d+): loss (\S+),/gm)].map((m) => ({ iter: Number(m[1]), loss: m[2] }));
    expect(cliLosses).toEqual(resumed.iters.map((i) => ({ iter: i.iter, loss: i.loss.toFixed(4) })));
    await page.close();
  });

  it('refuses a file that is not text, a text too small for block_size, and a model too large for 4 GiB; takes a text that fits', async () => {
    const page = await openPage(browser, isolatedUrl);
    const error = () => errorShown(page);
    await page.setInputFiles('#text-file', { name: 'weights.bin', mimeType: 'application/octet-stream', buffer: Buffer.from([0x00, 0xff, 0xfe, 0x80, 0x81]) });
    expect(await error()).toBe('weights.bin is not a text file (not UTF-8 text); drop a plain .txt file');
    // Dropped on the page, as a user would.
    const dropped = await page.evaluateHandle(() => {
      const transfer = new DataTransfer();
      transfer.items.add(new File(['To be, or not to be, that is the question.\n'.repeat(10)], 'short.txt', { type: 'text/plain' }));
      return transfer;
    });
    await page.dispatchEvent('#drop', 'drop', { dataTransfer: dropped });
    expect(await error()).toMatch(/^the text is too small for block_size 64: its last 10% \(the validation split\) holds 43 characters and needs more than 64; use a text of at least 650 characters, or lower block_size$/);
    // A text that is long enough replaces the Shakespeare text.
    await page.setInputFiles('#text-file', { name: 'sonnets.txt', mimeType: 'text/plain', buffer: Buffer.from('Shall I compare thee to a summer\'s day?\n'.repeat(40)) });
    await page.waitForFunction(() => document.getElementById('dataset')!.textContent!.startsWith('sonnets'));
    expect(await page.textContent('#dataset')).toBe('sonnets: 1,440 train and 160 val characters, vocabulary of 20');
    await setKeys(page, { n_layer: 24, n_embd: 4096, n_head: 32 });
    await page.click('#reset');
    expect(await error()).toMatch(/^this training run needs about [\d.]+ GiB \(parameters .*\), more than the WebAssembly engine's 4 GiB; lower batch_size/);
    await page.close();
  });

  it('stops a run that diverges in one line with the fix, and neither trains on, samples from nor downloads its weights', async () => {
    const page = await openPage(browser, isolatedUrl);
    await setKeys(page, { max_iters: 20, eval_interval: 100, learning_rate: 1e10 });
    await page.click('#reset');
    const message = await errorShown(page);
    expect(message).toMatch(/^training diverged at iteration \d+ \(a gradient norm of (NaN|Infinity)\): lower learning_rate and start a New run$/);
    expect((await history(page)).state).toBe('stopped');
    for (const button of ['#train', '#sample', '#download']) {
      await page.click(button);
      expect(await errorShown(page)).toBe(message);
    }
    await setKeys(page, { max_iters: 2, learning_rate: 1e-3 });
    const fresh = await trainUntilStopped(page, '#reset');
    expect(await page.textContent('#status')).toBe('finished at iteration 2');
    expect(fresh.iters.map((i) => i.iter)).toEqual([0, 1, 2]);
    await page.close();
  });

  it('stops between evaluation batches: Stop during an evaluation ends the run before its iteration, which Train starts again', async () => {
    const page = await openPage(browser, isolatedUrl);
    // An evaluation of 5000 batches per split takes far longer than the test waits for the stop. The worker takes
    // the Stop (the #train button while training) at its first yield, after the evaluation's first batch.
    await setKeys(page, { max_iters: 1, eval_interval: 1, eval_iters: 5000 });
    const stopped = await trainUntilStopped(page, '#reset', () => page.click('#train'), 10_000);
    expect(await page.textContent('#status')).toBe('stopped before iteration 0; Train continues');
    expect(stopped.evals).toEqual([]);
    expect(stopped.iters).toEqual([]);
    await setKeys(page, { eval_iters: 2 });
    const continued = await trainUntilStopped(page, '#train');
    expect(await page.textContent('#status')).toBe('finished at iteration 1');
    expect(continued.evals.map((e) => e.iter)).toEqual([0, 1]);
    expect(continued.iters.map((i) => i.iter)).toEqual([0, 1]);
    await page.close();
  });

  it('trains on one thread where the page is not cross-origin isolated', async () => {
    const { url, server } = await startServer('--isolated=False');
    servers.push(server);
    const page = await openPage(browser, url);
    expect(await page.evaluate(() => crossOriginIsolated)).toBe(false);
    expect((await history(page)).threads).toBe(1);
    await setKeys(page, { max_iters: 3, eval_iters: 2 });
    const run = await trainUntilStopped(page, '#reset');
    expect(run.iters).toHaveLength(4);
    await page.close();
  });

  it('measures iterations per second in the page (1 and 2 threads) and in Node.js (the same WebAssembly engine)', async () => {
    const results: string[] = [];
    for (const threads of [1, 2]) {
      const page = await openPage(browser, `${isolatedUrl}?threads=${threads}`);
      expect((await history(page)).threads).toBe(threads);
      await setKeys(page, { max_iters: 30, eval_interval: 1000, eval_iters: 1 });
      const run = await trainUntilStopped(page, '#reset');
      results.push(`page, ${threads} thread(s): ${(1000 / median(run.iters.slice(5).map((i) => i.stepMs))).toFixed(2)} it/s`);
      await page.close();
    }
    for (const threads of [1, 2]) {
      const shape = ['--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=64', '--batch_size=12', '--vocab_size=65'];
      const out = runCli(['bench', '--device=cpu', '--dtype=float32', '--engine=wasm', '--warmup=5', '--iters=25', ...shape], { NANOGPT_WASM_THREADS: String(threads) });
      const result = JSON.parse(/^RESULT (.*)$/m.exec(out)![1]) as { ms_per_iter: number };
      results.push(`Node.js, ${threads} thread(s): ${(1000 / result.ms_per_iter).toFixed(2)} it/s`);
    }
    console.log(`README CPU recipe shapes (4 layers, 128 wide, batch 12 x 64), training steps per second: ${results.join('; ')}`);
    expect(results).toHaveLength(4);
  });
});

// A machine without Chromium still checks that the page's checkpoint archive reads back.
it('writes zip archives that read back (the checkpoint download)', async () => {
  const { zip } = await import('../web/src/zip.ts');
  const files = [{ name: 'out/a.json', bytes: new TextEncoder().encode('{"x": 1}\n') }, { name: 'out/b.bin', bytes: Uint8Array.from([0, 1, 2, 255]) }];
  const archive = zip(files);
  expect(unzip(archive).map((e) => [e.name, Array.from(e.bytes)])).toEqual(files.map((f) => [f.name, Array.from(f.bytes)]));
  const path = join(work, `${basename(work)}.zip`);
  writeFileSync(path, archive);
  const check = spawnSync('unzip', ['-t', path], { encoding: 'utf8' });
  if (check.error === undefined) expect(check.stdout).toContain('No errors detected');
});
