// The CLI as a user runs it, on a tiny model: prepare, train, resume, sample. Needs the native engine
// (`npm run build:native`); without it these tests fail rather than skip, so CI cannot pass by accident.
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

const cli = fileURLToPath(new URL('../bin/nanogpt-rs.js', import.meta.url));
const corpus = fileURLToPath(new URL('../data/shakespeare_char/input.txt', import.meta.url));
const fixtureDir = fileURLToPath(new URL('./fixtures/hf-gpt2-tiny/', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'nanogpt-e2e-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

function run(...args: string[]) {
  return runWith({}, ...args);
}

function runWith(env: Record<string, string>, ...args: string[]) {
  const result = spawnSync(process.execPath, [cli, ...args], { cwd: work, encoding: 'utf8', env: { ...process.env, ...env } });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Runs the CLI, calling `onOutput` with the child and its stdout so far whenever stdout grows. */
function runWatching(args: string[], onOutput: (child: ReturnType<typeof spawn>, stdout: string) => void) {
  return new Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [cli, ...args], { cwd: work });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      onOutput(child, stdout);
    });
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr }));
  });
}

const tiny = [
  '--dataset=shakespeare_char',
  '--out_dir=out-tiny',
  '--n_layer=2',
  '--n_head=2',
  '--n_embd=32',
  '--block_size=32',
  '--batch_size=8',
  '--gradient_accumulation_steps=1',
  '--eval_interval=20',
  '--eval_iters=10',
  '--log_interval=5',
  '--learning_rate=1e-2',
  '--warmup_iters=5',
  '--lr_decay_iters=60',
  '--min_lr=1e-3',
];

const evalLosses = (stdout: string) =>
  [...stdout.matchAll(/^step (\d+): train loss ([\d.]+), val loss ([\d.]+)$/gm)].map((m) => ({
    step: Number(m[1]),
    train: Number(m[2]),
    val: Number(m[3]),
  }));

describe('nanogpt-rs end to end', () => {
  let first: ReturnType<typeof run>;
  beforeAll(() => {
    mkdirSync(join(work, 'data', 'shakespeare_char'), { recursive: true });
    copyFileSync(corpus, join(work, 'data', 'shakespeare_char', 'input.txt'));
    expect(run('prepare', 'shakespeare_char').status).toBe(0);
    first = run('train', ...tiny, '--max_iters=40');
  });

  it('trains from scratch with nanoGPT output, and the loss goes down', () => {
    expect(first.stderr).toBe('');
    expect(first.status).toBe(0);
    expect(first.stdout).toContain('tokens per iteration will be: 256');
    expect(first.stdout).toContain('found vocab_size = 65');
    expect(first.stdout).toContain('Initializing a new model from scratch');
    expect(first.stdout).toMatch(/^number of parameters: 0\.0\dM$/m);
    expect(first.stdout).toMatch(/^num decayed parameter tensors: \d+, with [\d,]+ parameters$/m);
    expect(first.stdout).toMatch(/^iter 5: loss [\d.]+, time [\d.]+ms, mfu n\/a$/m);
    const losses = evalLosses(first.stdout);
    expect(losses.map((l) => l.step)).toEqual([0, 20, 40]);
    expect(losses[0].val).toBeGreaterThan(3.8); // ln(65) = 4.17 before training
    expect(losses[2].val).toBeLessThan(losses[0].val - 0.5);
  });

  it('checkpoints at evaluations after iteration 0', () => {
    expect(first.stdout.match(/^saving checkpoint to out-tiny$/gm)).toHaveLength(2);
    const info = JSON.parse(readFileSync(join(work, 'out-tiny', 'ckpt.json'), 'utf8'));
    expect(info.iter_num).toBe(40);
    expect(info.model_args).toMatchObject({ n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, vocab_size: 65 });
    expect(info.config.dataset).toBe('shakespeare_char');
    expect(existsSync(join(work, 'out-tiny', 'model.safetensors'))).toBe(true);
    expect(existsSync(join(work, 'out-tiny', 'optimizer.safetensors'))).toBe(true);
  });

  it('resumes from the saved iteration', () => {
    const resumed = run('train', ...tiny, '--max_iters=60', '--init_from=resume');
    expect(resumed.stderr).toBe('');
    expect(resumed.stdout).toContain('Resuming training from out-tiny');
    const losses = evalLosses(resumed.stdout);
    expect(losses.map((l) => l.step)).toEqual([40, 60]);
    // The restored weights evaluate like the saved ones, not like a fresh model.
    expect(losses[0].val).toBeLessThan(evalLosses(first.stdout)[0].val - 0.5);
    expect(resumed.stdout).not.toMatch(/^iter [0-9]: /m);
    expect(JSON.parse(readFileSync(join(work, 'out-tiny', 'ckpt.json'), 'utf8')).iter_num).toBe(60);
  });

  it('logs every log and eval record to log.jsonl, with network-health figures, and plots them', () => {
    const records = readFileSync(join(work, 'out-tiny', 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const train = records.filter((r) => r.kind === 'train');
    const evals = records.filter((r) => r.kind === 'eval');
    // The first run logs 0, 5, ..., 40; the resumed one 40 (its first step), 45, ..., 60.
    expect(train.map((r) => r.iter)).toEqual([0, 5, 10, 15, 20, 25, 30, 35, 40, 40, 45, 50, 55, 60]);
    expect(evals.map((r) => r.iter)).toEqual([0, 20, 40, 40, 60]);
    for (const r of train) {
      expect(r.grad_norm).toBeGreaterThan(0);
      expect(r.clip_fraction).toBeGreaterThanOrEqual(0);
      expect(r.clip_fraction).toBeLessThanOrEqual(1);
      expect(r.tokens_per_s).toBeGreaterThan(0);
      expect(r.mfu).toBeNull();
      expect(Object.keys(r.update_ratio).sort()).toEqual(['h.0', 'h.1', 'ln_f', 'wpe', 'wte']);
      // grad_clip defaults to 1.0: a step is clipped exactly when its norm is above it.
      expect(r.clipped).toBe(r.grad_norm > 1.0);
    }
    // Warm-up starts at lr/(warmup+1).
    expect(train[0].lr).toBeCloseTo(1e-2 / 6);
    const plotted = run('plot', '--out_dir=out-tiny');
    expect(plotted.status).toBe(0);
    expect(plotted.stdout).toContain('wrote out-tiny/plot.html');
    expect(readFileSync(join(work, 'out-tiny', 'plot.html'), 'utf8').match(/<svg/g)).toHaveLength(3);
  });

  it('samples text, each sample followed by dashes: what the library samples for the same seed', async () => {
    const result = run('sample', '--out_dir=out-tiny', '--start=ROMEO:', '--num_samples=2', '--max_new_tokens=40');
    expect(result.stderr).toBe('');
    const [settings, body] = result.stdout.split('Loading meta from data/shakespeare_char/meta.json...\n');
    expect(settings).toContain('Overriding: start = ROMEO:');
    const samples = body.split('---------------\n');
    expect(samples).toHaveLength(3);
    expect(samples.pop()).toBe('');
    for (const sample of samples) expect(sample).toMatch(/^ROMEO:[\s\S]{40}\n$/);
    expect(samples[0]).not.toBe(samples[1]);
    const { sample } = await import('../ts/index.ts');
    const fromLibrary = await sample({ data_dir: join(work, 'data'), out_dir: join(work, 'out-tiny'), start: 'ROMEO:', num_samples: 2, max_new_tokens: 40 });
    expect(samples).toEqual(fromLibrary.map((text) => `${text}\n`));
  });

  it('names a prompt character outside the vocabulary', () => {
    const result = run('sample', '--out_dir=out-tiny', '--start=café', '--num_samples=1');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe('error: character "é" (U+00E9) is not in the 65-character vocabulary of this model; remove it from the prompt\n');
  });

  it('asks for at least one sample', () => {
    const result = run('sample', '--out_dir=out-tiny', '--num_samples=0');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe('error: num_samples must be at least 1, got 0\n');
  });

  it('reports a corrupt checkpoint in one line', () => {
    const dir = join(work, 'out-broken');
    mkdirSync(dir);
    copyFileSync(join(work, 'out-tiny', 'ckpt.json'), join(dir, 'ckpt.json'));
    writeFileSync(join(dir, 'model.safetensors'), 'not safetensors');
    const result = run('sample', '--out_dir=out-broken');
    expect(result.status).toBe(1);
    expect(result.stderr).toMatch(/^error: cannot load checkpoint out-broken\/model.safetensors: .+\n$/);
  });

  it('exports a checkpoint as a Hugging Face GPT-2 folder that loads back to the same model', async () => {
    const result = run('export', '--out_dir=out-tiny', '--to=hf-tiny');
    expect(result.stderr).toBe('');
    expect(result.stdout).toBe('exported out-tiny (iteration 60) as a Hugging Face GPT-2 to hf-tiny\n');
    const config = JSON.parse(readFileSync(join(work, 'hf-tiny', 'config.json'), 'utf8'));
    expect(config).toMatchObject({ model_type: 'gpt2', architectures: ['GPT2LMHeadModel'], n_layer: 2, n_head: 2, n_embd: 32, n_positions: 32, n_ctx: 32, vocab_size: 65, activation_function: 'gelu', tie_word_embeddings: true });
    // The same tensor names as a GPT-2 saved by transformers (the fixture has 2 layers too).
    const names = (path: string) => {
      const bytes = readFileSync(path);
      return Object.keys(JSON.parse(bytes.subarray(8, 8 + Number(bytes.readBigUInt64LE(0))).toString('utf8'))).sort();
    };
    expect(names(join(work, 'hf-tiny', 'model.safetensors'))).toEqual(names(join(fixtureDir, 'model.safetensors')));

    const { Engine } = await import('../ts/engine.ts');
    const info = JSON.parse(readFileSync(join(work, 'out-tiny', 'ckpt.json'), 'utf8'));
    const saved = Engine.fromSafetensorsFile({ ...info.model_args, dropout: 0 }, join(work, 'out-tiny', 'model.safetensors'));
    const exported = Engine.fromHfGpt2File(JSON.stringify(config), join(work, 'hf-tiny', 'model.safetensors'), 0);
    const prompt = Uint32Array.from([1, 2, 3]);
    expect(exported.generate(prompt, 40, 0.8, 0, 7)).toEqual(saved.generate(prompt, 40, 0.8, 0, 7));
  });

  it('finetunes from a Hugging Face folder with init_from=<path>, cropping the context', () => {
    const result = run('train', ...tiny, '--init_from=hf-tiny', '--out_dir=out-ft', '--block_size=16', '--dropout=0.1', '--max_iters=20');
    expect(result.stderr).toBe('');
    expect(result.stdout).toContain('Initializing from Hugging Face GPT-2 weights: hf-tiny');
    expect(result.stdout).toContain('forcing vocab_size=65, block_size=32, bias=True');
    expect(result.stdout).toContain('overriding dropout rate to 0.1');
    // Starts where the exported model left off, far below an untrained model's ln(65) = 4.17.
    expect(evalLosses(result.stdout)[0].val).toBeLessThan(3.5);
    const info = JSON.parse(readFileSync(join(work, 'out-ft', 'ckpt.json'), 'utf8'));
    expect(info.model_args).toMatchObject({ block_size: 16, bias: true, gelu: 'erf', vocab_size: 65, dropout: 0.1 });
  });

  it('samples from init_from=gpt2 found in the Hugging Face cache, with GPT-2 encoding', () => {
    // The tiny fixture stands in for OpenAI's gpt2; its 1000-token vocabulary covers the default prompt "\n" (198).
    const snapshot = join(work, 'hf-home', 'hub', 'models--openai-community--gpt2', 'snapshots', 'abc');
    mkdirSync(snapshot, { recursive: true });
    for (const file of ['config.json', 'model.safetensors']) copyFileSync(join(fixtureDir, file), join(snapshot, file));
    const env = { HF_HOME: join(work, 'hf-home'), HF_HUB_OFFLINE: '1' };
    const result = runWith(env, 'sample', '--init_from=gpt2', '--num_samples=2', '--max_new_tokens=8');
    expect(result.stderr).toBe('');
    expect(result.stdout).toContain('forcing vocab_size=1000, block_size=64, bias=True');
    const [, body] = result.stdout.split('No meta.json found, assuming GPT-2 encodings...\n');
    const samples = body.split('---------------\n');
    expect(samples).toHaveLength(3);
    for (const sample of samples.slice(0, 2)) expect(sample).toMatch(/^\n[\s\S]+\n$/);

    const missing = runWith(env, 'sample', '--init_from=gpt2-xl');
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/^error: gpt2-xl is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; put config.json and model.safetensors from .+ into .+\n$/);
  });

  it('names the datasets it can prepare', () => {
    const result = run('prepare', 'shakespeare-char');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe(
      "error: nanogpt-rs cannot prepare dataset 'shakespeare-char'; available: shakespeare_char, shakespeare, openwebtext, text (your own files: prepare text --name=NAME FILE...)\n",
    );
  });

  it('reports an unknown key before doing any work', () => {
    const result = run('train', '--n_embed=64');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe("error: unknown config key 'n_embed'; did you mean 'n_embd'? (--help lists every key)\n");
  });
});

describe('Ctrl-C during train', () => {
  const endless = (outDir: string) => ['train', ...tiny, `--out_dir=${outDir}`, '--max_iters=100000', '--eval_interval=100000', '--eval_iters=1', '--log_interval=1'];

  it('writes a checkpoint at the end of the current step and exits', async () => {
    let sent = false;
    const result = await runWatching(endless('out-int'), (child, stdout) => {
      if (!sent && /^iter 3: /m.test(stdout)) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    expect(result.stderr).toBe('');
    expect(result.status).toBe(130);
    expect(result.stdout).toContain('interrupted: stopping after this step and saving a checkpoint');
    expect(result.stdout).toContain('saving checkpoint to out-int');
    const last = Number(/^stopped at iteration (\d+); resume with --init_from=resume --out_dir=out-int$/m.exec(result.stdout)![1]);
    expect(last).toBeGreaterThanOrEqual(3);
    expect(result.stdout).toMatch(new RegExp(`^iter ${last}: `, 'm'));
    expect(JSON.parse(readFileSync(join(work, 'out-int', 'ckpt.json'), 'utf8')).iter_num).toBe(last + 1);
  });

  it('a second Ctrl-C exits at once, without a checkpoint', async () => {
    const sent: string[] = [];
    // A model whose checkpoint takes a while to write, so that the second Ctrl-C lands during the save.
    const large = ['--n_layer=8', '--n_head=8', '--n_embd=512', '--block_size=32', '--batch_size=1', '--engine=native'];
    const result = await runWatching([...endless('out-int2'), ...large], (child, stdout) => {
      if (sent.length === 0 && /^iter 1: /m.test(stdout)) sent.push(String(child.kill('SIGINT')));
      if (sent.length === 1 && stdout.includes('interrupted: stopping after this step')) sent.push(String(child.kill('SIGINT')));
    });
    expect(sent).toEqual(['true', 'true']);
    expect(result.signal).toBe('SIGINT');
    expect(result.stdout).not.toContain('stopped at iteration');
    expect(existsSync(join(work, 'out-int2', 'ckpt.json'))).toBe(false);
  });
});

describe('library API', () => {
  it('reports through onLog without printing, and stops on an AbortSignal with a checkpoint of the last step', async () => {
    const { train } = await import('../ts/index.ts');
    const printed = vi.spyOn(console, 'log');
    const written = vi.spyOn(process.stdout, 'write');
    const stop = new AbortController();
    const events: Array<{ kind: string; message: string }> = [];
    const outDir = join(work, 'out-abort');
    const result = await train(
      { data_dir: join(work, 'data'), dataset: 'shakespeare_char', out_dir: outDir, n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, batch_size: 4, gradient_accumulation_steps: 1, max_iters: 1000, eval_interval: 1000, eval_iters: 2, log_interval: 1 },
      {
        signal: stop.signal,
        onLog: (event) => {
          events.push(event);
          if (event.kind === 'iter' && event.iter === 3) stop.abort();
        },
      },
    );
    expect(printed).not.toHaveBeenCalled();
    expect(written).not.toHaveBeenCalled();
    printed.mockRestore();
    written.mockRestore();
    expect(result).toMatchObject({ stopped: true, iter_num: 3, iterations: 4 });
    expect(events.map((e) => e.kind).filter((kind) => kind !== 'info')).toEqual(['eval', 'iter', 'iter', 'iter', 'iter', 'stop', 'checkpoint']);
    expect(events.find((e) => e.kind === 'stop')).toMatchObject({ iter: 3, message: 'stopping after iteration 3' });
    expect(events.map((e) => e.message)).toContain('Initializing a new model from scratch');
    expect(events.at(-1)!.message).toBe(`saving checkpoint to ${outDir}`);
    expect(JSON.parse(readFileSync(join(outDir, 'ckpt.json'), 'utf8')).iter_num).toBe(4);
  });

  it('trains and samples with plain config objects, returning results', async () => {
    const { train, sample } = await import('../ts/index.ts');
    const dataDir = join(work, 'data');
    const outDir = join(work, 'out-api');
    const result = await train({
      data_dir: dataDir,
      dataset: 'shakespeare_char',
      out_dir: outDir,
      n_layer: 1,
      n_head: 2,
      n_embd: 16,
      block_size: 16,
      batch_size: 4,
      gradient_accumulation_steps: 2,
      max_iters: 10,
      eval_interval: 10,
      eval_iters: 2,
      log_interval: 100,
      warmup_iters: 2,
    });
    expect(result).toMatchObject({ iter_num: 10, iterations: 11, out_dir: outDir });
    expect(result.last_eval?.val).toBe(result.best_val_loss);
    const samples = await sample({ data_dir: dataDir, out_dir: outDir, start: 'To be', num_samples: 3, max_new_tokens: 5 });
    expect(samples).toHaveLength(3);
    for (const text of samples) expect(text).toMatch(/^To be[\s\S]{5}$/);
  });

  it('streams the same text as sample gives for the same seed, on both engines, past the block size', async () => {
    const { sample, generate } = await import('../ts/index.ts');
    const options = { data_dir: join(work, 'data'), out_dir: join(work, 'out-api'), start: 'To be', num_samples: 2, max_new_tokens: 30, seed: 7 };
    for (const engine of ['wasm', 'native']) {
      const batch = await sample({ ...options, engine });
      const streamed = ['', ''];
      let chunks = 0;
      for await (const chunk of generate({ ...options, engine })) {
        streamed[chunk.sample] += chunk.text;
        chunks++;
      }
      expect(chunks).toBe(2 * 31); // the prompt, then one chunk per character token
      expect(streamed).toEqual(batch);
      expect(batch[0]).not.toEqual(batch[1]);
    }
  });
});
