// Hugging Face GPT-2 models for init_from: OpenAI's weights by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)
// or any GPT-2 saved by transformers (or by `nanogpt-rs export`) by path. Named models are looked up as a path
// first, then in the Hugging Face cache, and only then downloaded into that cache.
import { createWriteStream, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Engine, type EngineChoice } from './engine.ts';
import { firstLine, UserError } from './errors.ts';
import { writeFileAtomic } from './files.ts';

export const gpt2Models = ['gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'] as const;

const files = ['config.json', 'model.safetensors'] as const;

export interface HfModelFiles {
  config: string;
  weights: string;
}

/**
 * The files of `initFrom`: a folder holding config.json and model.safetensors, a .safetensors file with
 * config.json beside it, or a GPT-2 name (cached, else downloaded).
 */
export async function findHfModel(initFrom: string, log: (line: string) => void = console.log): Promise<HfModelFiles> {
  const local = filesAt(initFrom);
  if (local) return local;
  if (!(gpt2Models as readonly string[]).includes(initFrom)) {
    throw new UserError(`init_from=${initFrom} is neither scratch, resume, ${gpt2Models.join(', ')} nor a folder with config.json and model.safetensors (or a .safetensors file with config.json beside it)`);
  }
  const repo = join(hubCache(), `models--openai-community--${initFrom}`);
  const snapshots = join(repo, 'snapshots');
  for (const snapshot of existsSync(snapshots) ? readdirSync(snapshots) : []) {
    const cached = filesAt(join(snapshots, snapshot));
    if (cached) return cached;
  }
  return download(initFrom, repo, log);
}

/** The engine for `initFrom`'s weights, printing nanoGPT's from_pretrained lines. */
export async function loadHfModel(
  initFrom: string,
  dropout: number,
  device: string,
  engineChoice: EngineChoice = 'auto',
  log: (line: string) => void = console.log,
): Promise<Engine> {
  const found = await findHfModel(initFrom, log);
  const config = readFileSync(found.config, 'utf8');
  log(`loading weights from ${found.weights}`);
  let engine: Engine;
  try {
    engine = Engine.fromHfGpt2File(config, found.weights, dropout, device, engineChoice);
  } catch (err) {
    throw new UserError(`cannot load the GPT-2 model ${found.weights}: ${firstLine(err)}`);
  }
  const args = engine.modelArgs();
  log(`forcing vocab_size=${args.vocab_size}, block_size=${args.block_size}, bias=True`);
  log(`overriding dropout rate to ${Number.isInteger(dropout) ? dropout.toFixed(1) : dropout}`);
  return engine;
}

function filesAt(path: string): HfModelFiles | undefined {
  if (!existsSync(path)) return undefined;
  if (statSync(path).isDirectory()) {
    const [config, weights] = files.map((file) => join(path, file));
    return existsSync(config) && existsSync(weights) ? { config, weights } : undefined;
  }
  const config = join(dirname(path), 'config.json');
  if (path.endsWith('.safetensors') && existsSync(config)) return { config, weights: path };
  return undefined;
}

/** The hub cache as huggingface_hub places it, so that models it downloaded are found and ours are shared. */
function hubCache(): string {
  return join(process.env.HF_HOME ?? join(homedir(), '.cache', 'huggingface'), 'hub');
}

/** Fetches the two files into the cache's layout: refs/main names the snapshot folder holding them. */
async function download(name: string, repo: string, log: (line: string) => void): Promise<HfModelFiles> {
  // HF_ENDPOINT (a mirror) and HF_HUB_OFFLINE mean what they mean to huggingface_hub.
  const base = `${process.env.HF_ENDPOINT ?? 'https://huggingface.co'}/openai-community/${name}/resolve/main`;
  const whereToPut = `put config.json and model.safetensors from ${base}/ into ${join(repo, 'snapshots', 'main')}/ (or pass their folder as --init_from)`;
  if (process.env.HF_HUB_OFFLINE === '1') {
    throw new UserError(`${name} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; ${whereToPut}`);
  }
  let commit = 'main';
  const fetched: Partial<Record<(typeof files)[number], string>> = {};
  for (const file of files) {
    let response: Response;
    try {
      response = await fetch(`${base}/${file}`);
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
    } catch (err) {
      throw new UserError(`${name} is not in the Hugging Face cache and cannot be downloaded (${firstLine(err)}); ${whereToPut}`);
    }
    commit = response.headers.get('x-repo-commit') ?? commit;
    const path = join(repo, 'snapshots', commit, file);
    mkdirSync(dirname(path), { recursive: true });
    await save(response, path, `${name}/${file}`, log);
    fetched[file] = path;
  }
  mkdirSync(join(repo, 'refs'), { recursive: true });
  writeFileAtomic(join(repo, 'refs', 'main'), commit);
  return { config: fetched['config.json']!, weights: fetched['model.safetensors']! };
}

/** Streams a response to `path` (through a temporary file, so an interrupted download is never taken as done). */
async function save(response: Response, path: string, label: string, log: (line: string) => void): Promise<void> {
  const total = Number(response.headers.get('content-length') ?? 0);
  const temp = `${path}.incomplete`;
  let received = 0;
  let shown = -1;
  const body = Readable.fromWeb(response.body! as import('node:stream/web').ReadableStream<Uint8Array>);
  body.on('data', (chunk: Buffer) => {
    received += chunk.length;
    const percent = total > 0 ? Math.floor((100 * received) / total) : -1;
    if (percent !== shown && percent % 10 === 0) {
      shown = percent;
      log(`downloading ${label}: ${(received / 1e6).toFixed(0)} / ${(total / 1e6).toFixed(0)} MB (${percent}%)`);
    }
  });
  try {
    await pipeline(body, createWriteStream(temp));
  } catch (err) {
    rmSync(temp, { force: true });
    throw new UserError(`the download of ${label} failed (${firstLine(err)}); run again to retry`);
  }
  renameSync(temp, path);
}
