// init_from=<GPT-2 name or path>: where the Hugging Face files are found (path, cache, download into the cache),
// and what the engine makes of them, on the tiny GPT-2 fixture in test/fixtures (a 2-layer model saved by transformers).
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { findHfModel, loadHfModel } from '../ts/pretrained.ts';

const fixtureDir = fileURLToPath(new URL('./fixtures/hf-gpt2-tiny/', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'nanogpt-pretrained-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** The tensors of a safetensors file (only the dtypes the fixture uses). */
function readSafetensors(path: string): Record<string, { shape: number[]; data: Float32Array | BigInt64Array }> {
  const bytes = readFileSync(path);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const body = bytes.subarray(8 + headerLength);
  const tensors: ReturnType<typeof readSafetensors> = {};
  for (const [name, { dtype, shape, data_offsets: [start, end] }] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const copy = body.buffer.slice(body.byteOffset + start, body.byteOffset + end);
    tensors[name] = { shape, data: dtype === 'I64' ? new BigInt64Array(copy) : new Float32Array(copy) };
  }
  return tensors;
}

const env = { HF_HOME: process.env.HF_HOME, HF_ENDPOINT: process.env.HF_ENDPOINT, HF_HUB_OFFLINE: process.env.HF_HUB_OFFLINE };
let home: string;
beforeEach(() => {
  home = mkdtempSync(join(work, 'hf-home-'));
  process.env.HF_HOME = home;
  delete process.env.HF_ENDPOINT;
  delete process.env.HF_HUB_OFFLINE;
});
afterEach(() => {
  for (const [key, value] of Object.entries(env)) {
    if (value === undefined) delete process.env[key];
    else process.env[key] = value;
  }
});

describe('finding Hugging Face GPT-2 files', () => {
  it('takes a folder, or a .safetensors file with config.json beside it', async () => {
    const folder = { config: join(fixtureDir, 'config.json'), weights: join(fixtureDir, 'model.safetensors') };
    expect(await findHfModel(fixtureDir)).toEqual(folder);
    expect(await findHfModel(join(fixtureDir, 'model.safetensors'))).toEqual(folder);
  });

  it('rejects what is neither a GPT-2 name nor such a path', async () => {
    await expect(findHfModel(join(work, 'nowhere'))).rejects.toThrow(/is neither scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl nor a folder/);
  });

  it('finds a GPT-2 name in the Hugging Face cache', async () => {
    const snapshot = join(home, 'hub', 'models--openai-community--gpt2', 'snapshots', '0123abc');
    mkdirSync(snapshot, { recursive: true });
    for (const file of ['config.json', 'model.safetensors']) copyFileSync(join(fixtureDir, file), join(snapshot, file));
    process.env.HF_HUB_OFFLINE = '1';
    expect(await findHfModel('gpt2')).toEqual({ config: join(snapshot, 'config.json'), weights: join(snapshot, 'model.safetensors') });
  });

  it('offline with nothing cached, says where to put the files', async () => {
    process.env.HF_HUB_OFFLINE = '1';
    const expected = join(home, 'hub', 'models--openai-community--gpt2-medium', 'snapshots', 'main');
    await expect(findHfModel('gpt2-medium')).rejects.toThrow(`put config.json and model.safetensors from https://huggingface.co/openai-community/gpt2-medium/resolve/main/ into ${expected}/`);
  });

  it('an unreachable hub is a one-line error too', async () => {
    process.env.HF_ENDPOINT = 'http://127.0.0.1:9'; // the discard port: connection refused
    await expect(findHfModel('gpt2')).rejects.toThrow(/^gpt2 is not in the Hugging Face cache and cannot be downloaded \(.*\); put config.json/);
  });

  describe('downloading into the cache', () => {
    let server: Server;
    const requests: string[] = [];
    beforeEach(async () => {
      server = createServer((req, res) => {
        requests.push(req.url!);
        const file = req.url!.match(/^\/openai-community\/gpt2\/resolve\/main\/(config\.json|model\.safetensors)$/)?.[1];
        if (!file) return void res.writeHead(404).end();
        const body = readFileSync(join(fixtureDir, file));
        res.writeHead(200, { 'content-length': body.length, 'x-repo-commit': 'feedc0de' }).end(body);
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      process.env.HF_ENDPOINT = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    });
    afterEach(() => void server.close());

    it('fetches config.json and model.safetensors into the snapshot of refs/main, with progress', async () => {
      const lines: string[] = [];
      const found = await findHfModel('gpt2', (line) => lines.push(line));
      const repo = join(home, 'hub', 'models--openai-community--gpt2');
      expect(found).toEqual({ config: join(repo, 'snapshots', 'feedc0de', 'config.json'), weights: join(repo, 'snapshots', 'feedc0de', 'model.safetensors') });
      expect(readFileSync(join(repo, 'refs', 'main'), 'utf8')).toBe('feedc0de');
      expect(readFileSync(found.weights).equals(readFileSync(join(fixtureDir, 'model.safetensors')))).toBe(true);
      expect(existsSync(`${found.weights}.incomplete`)).toBe(false);
      expect(lines.at(-1)).toMatch(/^downloading gpt2\/model\.safetensors: 1 \/ 1 MB \(100%\)$/);
      // Found in the cache the second time: no request.
      requests.length = 0;
      expect(await findHfModel('gpt2')).toEqual(found);
      expect(requests).toEqual([]);
    });
  });
});

describe('loading Hugging Face GPT-2 weights', () => {
  it("prints nanoGPT's lines and computes transformers' loss", async () => {
    const lines: string[] = [];
    const engine = await loadHfModel(fixtureDir, 0.1, 'cpu', 'auto', (line) => lines.push(line));
    expect(lines.slice(1)).toEqual(['forcing vocab_size=1000, block_size=64, bias=True', 'overriding dropout rate to 0.1']);
    expect(engine.modelArgs()).toEqual({ n_layer: 2, n_head: 4, n_embd: 64, block_size: 64, vocab_size: 1000, bias: true, dropout: 0.1, gelu: 'tanh' });

    const reference = readSafetensors(join(fixtureDir, 'reference.safetensors'));
    const ids = Array.from(reference.input_ids.data as BigInt64Array, Number);
    const [rows, t] = reference.input_ids.shape;
    // transformers' loss with labels = input_ids: each position predicts the next; the last predicts nothing.
    const y = Int32Array.from(ids, (_, i) => (i % t === t - 1 ? -1 : ids[i + 1]));
    const loss = engine.evalLoss(Uint32Array.from(ids), y, rows);
    expect(Math.abs(loss - (reference.loss.data as Float32Array)[0])).toBeLessThanOrEqual(1e-5);
  });

  it('crops the context to a smaller block_size', async () => {
    const engine = await loadHfModel(fixtureDir, 0, 'cpu', 'auto', () => {});
    engine.cropBlockSize(16);
    expect(engine.modelArgs().block_size).toBe(16);
    expect(() => engine.cropBlockSize(32)).toThrow("between 1 and the model's 16");
  });
});
