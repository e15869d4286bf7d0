// The CLI as a user runs it, on a tiny model: prepare, train, resume, sample. Needs the native engine
// (`npm run build:native`); without it these tests fail rather than skip, so CI cannot pass by accident.
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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
    const [settings, body] = result.stdout.split('Loading meta from out-tiny/meta.json...\n');
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

  it('asks for at least one sample, no fewer than 0 new tokens, and a top_k of 0 or more', () => {
    const result = run('sample', '--out_dir=out-tiny', '--num_samples=0');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe('error: num_samples must be at least 1, got 0\n');
    const negative = run('sample', '--out_dir=out-tiny', '--max_new_tokens=-1');
    expect(negative.status).toBe(1);
    expect(negative.stderr).toBe('error: max_new_tokens must be a whole number of at least 0, got -1\n');
    const topK = run('sample', '--out_dir=out-tiny', '--top_k=-1');
    expect(topK.status).toBe(1);
    expect(topK.stderr).toBe('error: top_k must be 0 (all tokens) or more, got -1\n');
  });

  it('serve takes True or False for isolated and a port number, and names the mistake otherwise', () => {
    for (const [flag, error] of [
      ['--isolated=maybe', "--isolated expects True or False, got 'maybe'"],
      ['--port=abc', "--port expects a port number from 0 to 65535 (0 picks a free one), got 'abc'"],
      ['--port=70000', "--port expects a port number from 0 to 65535 (0 picks a free one), got '70000'"],
    ]) {
      const result = run('serve', flag);
      expect(result.status, flag).toBe(1);
      expect(result.stderr, flag).toBe(`error: ${error}\n`);
    }
  });

  it("samples a checkpoint away from its data with the vocabulary it carries, and asks for data_dir when it has none", () => {
    const away = join(work, 'elsewhere');
    mkdirSync(away, { recursive: true });
    const outDir = join(work, 'out-tiny');
    const moved = spawnSync(process.execPath, [cli, 'sample', `--out_dir=${outDir}`, '--num_samples=1', '--max_new_tokens=5'], { cwd: away, encoding: 'utf8' });
    expect(moved.stderr).toBe('');
    expect(moved.stdout).toContain(`Loading meta from ${join(outDir, 'meta.json')}...`);

    const bare = join(work, 'out-no-vocabulary');
    mkdirSync(bare);
    for (const file of ['ckpt.json', 'model.safetensors']) copyFileSync(join(outDir, file), join(bare, file));
    const result = run('sample', '--out_dir=out-no-vocabulary', '--data_dir=nowhere');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe(
      "error: the model's vocabulary has 65 tokens, fewer than GPT-2's, and neither out-no-vocabulary nor nowhere/shakespeare_char holds it (meta.json or meta.pkl); point --data_dir at the data it was trained on\n",
    );
    // Without --data_dir, the one it was trained with.
    expect(run('sample', '--out_dir=out-no-vocabulary', '--num_samples=1', '--max_new_tokens=5').stdout).toContain('Loading meta from data/shakespeare_char/meta.json...');
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
    // The library's export says the same through its log option, and prints nothing.
    const { exportHf } = await import('../ts/index.ts');
    const logged: string[] = [];
    exportHf({ out_dir: join(work, 'out-tiny'), to: join(work, 'hf-tiny-library'), log: (line) => logged.push(line) });
    expect(logged).toEqual([`exported ${join(work, 'out-tiny')} (iteration 60) as a Hugging Face GPT-2 to ${join(work, 'hf-tiny-library')}`]);
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
      "error: cannot prepare dataset 'shakespeare-char'; available: shakespeare_char, shakespeare, openwebtext, text (your own files: npx nanogpt-rs prepare text --name=NAME FILE...)\n",
    );
  });

  it('reports an unknown key before doing any work', () => {
    const result = run('train', '--n_embed=64');
    expect(result.status).toBe(1);
    expect(result.stderr).toBe("error: unknown config key 'n_embed'; did you mean 'n_embd'? (--help lists every key)\n");
  });

  it('refuses a device name other than cpu, cuda or cuda:N before looking for the data or checkpoint', () => {
    const refusals = {
      gpu: 'unknown device `gpu`: use cpu, cuda or cuda:N',
      mps: "device `mps` (Apple's Metal) has no engine here; use --device=cpu",
    };
    for (const [device, refusal] of Object.entries(refusals)) {
      for (const command of [['train', '--dataset=not_prepared'], ['sample', '--out_dir=not_trained']]) {
        const result = run(...command, `--device=${device}`);
        expect(result.status).toBe(1);
        expect(result.stderr).toBe(`error: ${refusal}\n`);
      }
    }
    // A misspelt name is refused before the engine that cannot run on it; a device that exists hears of the engine.
    const misspelt = run('train', '--dataset=not_prepared', '--device=gpu', '--engine=wasm');
    expect(misspelt.status).toBe(1);
    expect(misspelt.stderr).toBe(`error: ${refusals.gpu}\n`);
    const wasm = run('train', '--dataset=not_prepared', '--device=cuda', '--engine=wasm');
    expect(wasm.status).toBe(1);
    expect(wasm.stderr).toBe('error: the WebAssembly engine runs on the cpu only; use --device=cpu, or --engine=native for --device=cuda\n');
  });
});

describe('Ctrl-C during train', () => {
  const endless = (outDir: string) => ['train', ...tiny, `--out_dir=${outDir}`, '--max_iters=100000', '--eval_interval=100000', '--eval_iters=1', '--log_interval=1'];

  it('writes a checkpoint at the end of the current step, prints the command that resumes it and exits', async () => {
    let sent = false;
    const args = endless('out-int');
    const result = await runWatching(args, (child, stdout) => {
      if (!sent && /^iter 3: /m.test(stdout)) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    expect(result.stderr).toBe('');
    expect(result.status).toBe(130);
    expect(result.stdout).toContain('interrupted: stopping and saving a checkpoint (Ctrl-C again to quit now)');
    expect(result.stdout).toContain('saving checkpoint to out-int');
    const stopped = /^stopped at iteration (\d+); the checkpoint in out-int resumes at iteration (\d+): (.*)$/m.exec(result.stdout)!;
    const last = Number(stopped[1]);
    expect(last).toBeGreaterThanOrEqual(3);
    expect(Number(stopped[2])).toBe(last + 1);
    expect(stopped[3]).toBe(`npx nanogpt-rs ${args.join(' ')} --init_from=resume`);
    expect(result.stdout).toMatch(new RegExp(`^iter ${last}: `, 'm'));
    expect(JSON.parse(readFileSync(join(work, 'out-int', 'ckpt.json'), 'utf8')).iter_num).toBe(last + 1);
  });

  it('a second Ctrl-C quits, even when both arrive during one call into the engine', async () => {
    let sent = false;
    // After its set-up lines the process evaluates, one call into the engine per batch, and these batches take a
    // while (about 100 GFLOP each): two signals 20 ms apart land inside the first call, where the process sees
    // neither until it returns. (Sent at once, the system would merge them into one.)
    const large = ['--n_layer=8', '--n_head=8', '--n_embd=512', '--block_size=128', '--batch_size=16', '--engine=native'];
    const result = await runWatching([...endless('out-int2'), ...large], (child, stdout) => {
      if (!sent && /^num non-decayed parameter tensors/m.test(stdout)) {
        sent = true;
        child.kill('SIGINT');
        setTimeout(() => child.kill('SIGINT'), 20);
      }
    });
    expect(result.stderr).toBe('');
    expect(result.status).toBe(130);
    expect(result.stdout).toContain('interrupted: stopping and saving a checkpoint (Ctrl-C again to quit now)');
    expect(result.stdout).not.toContain('step 0:');
    expect(result.stdout).not.toContain('stopped at iteration');
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

  /**
   * A signal that reads as aborted at its `read`-th look after iteration `iter`'s log line, the onLog that counts
   * from there, the events logged, and how many looks there were.
   */
  const abortAtRead = (iter: number, read: number) => {
    let looks: number | undefined;
    const signal = {
      get aborted() {
        if (looks !== undefined) looks += 1;
        return looks !== undefined && looks >= read;
      },
    } as AbortSignal;
    const events: Array<{ kind: string; message: string; iter?: number }> = [];
    const onLog = (event: { kind: string; message: string; iter?: number }) => {
      events.push(event);
      if (event.kind === 'iter' && event.iter === iter) looks = 0;
    };
    return { signal, onLog, events, reads: () => looks };
  };
  const small = { data_dir: join(work, 'data'), dataset: 'shakespeare_char', n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, batch_size: 4, gradient_accumulation_steps: 1, eval_iters: 2, log_interval: 1 };

  it('saves nothing when stopped before its first step, keeping the checkpoint already in out_dir', async () => {
    const { train } = await import('../ts/index.ts');
    const outDir = join(work, 'out-stop-early');
    await train({ ...small, out_dir: outDir, max_iters: 2, eval_interval: 2 });
    const saved = readFileSync(join(outDir, 'model.safetensors'));
    const events: Array<{ kind: string; message: string }> = [];
    const result = await train({ ...small, out_dir: outDir, max_iters: 100 }, { signal: AbortSignal.abort(), onLog: (event) => events.push(event) });
    expect(result).toMatchObject({ stopped: true, iterations: 0 });
    expect(events.find((e) => e.kind === 'stop')?.message).toBe('stopping before the first iteration');
    expect(events.map((e) => e.kind)).not.toContain('checkpoint');
    expect(readFileSync(join(outDir, 'model.safetensors')).equals(saved)).toBe(true);
    expect(JSON.parse(readFileSync(join(outDir, 'ckpt.json'), 'utf8')).iter_num).toBe(2);
  });

  it('with always_save_checkpoint=False, a stop keeps the best checkpoint unless its weights beat it', async () => {
    const { train } = await import('../ts/index.ts');
    const outDir = join(work, 'out-stop-best');
    await train({ ...small, out_dir: outDir, max_iters: 2, eval_interval: 2 });
    // A best val loss no model here reaches.
    const infoPath = join(outDir, 'ckpt.json');
    writeFileSync(infoPath, JSON.stringify({ ...JSON.parse(readFileSync(infoPath, 'utf8')), best_val_loss: 0.01 }));
    const saved = readFileSync(join(outDir, 'model.safetensors'));
    const stopAt = (iter: number) => {
      const stop = new AbortController();
      const messages: string[] = [];
      const onLog = (event: { kind: string; message: string; iter?: number }) => {
        messages.push(event.message);
        if (event.kind === 'iter' && event.iter === iter) stop.abort();
      };
      return { signal: stop.signal, onLog, messages };
    };
    const keep = stopAt(3);
    const kept = await train({ ...small, out_dir: outDir, init_from: 'resume', max_iters: 100, eval_interval: 100, always_save_checkpoint: false }, keep);
    expect(kept).toMatchObject({ stopped: true, iter_num: 3 });
    expect(keep.messages.find((m) => m.startsWith('val loss'))).toMatch(/^val loss \d\.\d{4} is not below the best, 0\.0100: the checkpoint of the best stays/);
    expect(readFileSync(join(outDir, 'model.safetensors')).equals(saved)).toBe(true);
    expect(JSON.parse(readFileSync(infoPath, 'utf8'))).toMatchObject({ iter_num: 2, best_val_loss: 0.01 });

    // The same stop with the best loss out of reach the other way saves, and records the new best.
    writeFileSync(infoPath, JSON.stringify({ ...JSON.parse(readFileSync(infoPath, 'utf8')), best_val_loss: 100 }));
    const improve = stopAt(3);
    await train({ ...small, out_dir: outDir, init_from: 'resume', max_iters: 100, eval_interval: 100, always_save_checkpoint: false }, improve);
    const info = JSON.parse(readFileSync(infoPath, 'utf8'));
    expect(info.iter_num).toBe(4);
    expect(info.best_val_loss).toBeLessThan(100);
  });

  it('refuses a dataset with more token ids than the model has, before training', async () => {
    const { train } = await import('../ts/index.ts');
    const outDir = join(work, 'out-vocab');
    await train({ ...small, out_dir: outDir, max_iters: 2, eval_interval: 2 });
    const wider = join(work, 'data', 'wider_vocab');
    mkdirSync(wider, { recursive: true });
    const chars = Array.from({ length: 100 }, (_, i) => String.fromCharCode(33 + i));
    writeFileSync(join(wider, 'meta.json'), JSON.stringify({ vocab_size: 100, itos: { ...chars }, stoi: Object.fromEntries(chars.map((c, i) => [c, i])) }));
    for (const split of ['train', 'val']) writeFileSync(join(wider, `${split}.bin`), Buffer.from(new Uint16Array(64).map((_, i) => i).buffer));
    await expect(train({ ...small, out_dir: outDir, init_from: 'resume', dataset: 'wider_vocab', max_iters: 4 })).rejects.toThrow(
      /^dataset wider_vocab has 100 token ids but the model's vocabulary has 65; train this model on the dataset it was made for/,
    );
  });

  it('stopped between micro-steps, drops their gradients and saves the weights of the last step', async () => {
    const { train } = await import('../ts/index.ts');
    const options = { ...small, gradient_accumulation_steps: 4, max_iters: 2 };
    // Stops once the micro-steps of iteration 2 have begun: the signal is read after each micro-step but the last,
    // and after each step; the first read after iteration 1's log line is the one after its step.
    const { signal, onLog, events } = abortAtRead(1, 2);
    const stoppedDir = join(work, 'out-stop-micro');
    const result = await train({ ...options, out_dir: stoppedDir, eval_interval: 1000 }, { signal, onLog });
    expect(result).toMatchObject({ stopped: true, iter_num: 1, iterations: 2 });
    expect(events.find((e) => e.kind === 'stop')?.message).toBe('stopping after iteration 1');
    // The same run evaluated and saved at iteration 2, before its micro-steps: the weights after step 1.
    const savedDir = join(work, 'out-eval-2');
    await train({ ...options, out_dir: savedDir, eval_interval: 2 });
    for (const file of ['model.safetensors', 'optimizer.safetensors']) {
      expect(readFileSync(join(stoppedDir, file)).equals(readFileSync(join(savedDir, file))), file).toBe(true);
    }
    expect(JSON.parse(readFileSync(join(stoppedDir, 'ckpt.json'), 'utf8')).iter_num).toBe(2);
  });

  it('stopped during an evaluation, leaves it unfinished and saves the weights of the last step', async () => {
    const { train } = await import('../ts/index.ts');
    const options = { ...small, eval_iters: 4, eval_interval: 2, max_iters: 2 };
    // The signal is read after each step and after each evaluation batch: the third read after iteration 1's log
    // line comes after the second of the four train batches of iteration 2's evaluation.
    const { signal, onLog, events, reads } = abortAtRead(1, 3);
    const stoppedDir = join(work, 'out-stop-eval');
    const result = await train({ ...options, out_dir: stoppedDir }, { signal, onLog });
    expect(result).toMatchObject({ stopped: true, iter_num: 1, iterations: 2 });
    expect(reads()).toBe(3);
    expect(events.filter((e) => e.kind === 'eval').map((e) => e.iter)).toEqual([0]);
    expect(events.find((e) => e.kind === 'stop')?.message).toBe('stopping after iteration 1');
    // The same run left to finish that evaluation saves at iteration 2 the same weights and optimizer state.
    const finishedDir = join(work, 'out-eval-finished');
    await train({ ...options, out_dir: finishedDir });
    for (const file of ['model.safetensors', 'optimizer.safetensors']) {
      expect(readFileSync(join(stoppedDir, file)).equals(readFileSync(join(finishedDir, file))), file).toBe(true);
    }
    expect(JSON.parse(readFileSync(join(stoppedDir, 'ckpt.json'), 'utf8')).iter_num).toBe(2);
  });

  it('stops a diverging run at its first step with a non-finite gradient norm, keeping the checkpoint saved before', async () => {
    const { train } = await import('../ts/index.ts');
    const outDir = join(work, 'out-diverge');
    await train({ ...small, out_dir: outDir, max_iters: 2, eval_interval: 2 });
    const saved = readFileSync(join(outDir, 'model.safetensors'));
    // One step at this rate makes the weights too large for the next step's products.
    const run = train({ ...small, out_dir: outDir, init_from: 'resume', max_iters: 20, eval_interval: 100, learning_rate: 1e10, warmup_iters: 0 });
    await expect(run).rejects.toThrow(
      new RegExp(`^training diverged at iteration 3 \\(a gradient norm of (NaN|Infinity)\\); the checkpoint of iteration 2 in ${outDir} is kept: lower --learning_rate and resume it with --init_from=resume$`),
    );
    expect(readFileSync(join(outDir, 'model.safetensors')).equals(saved)).toBe(true);
    const fresh = train({ ...small, out_dir: join(work, 'out-diverge-fresh'), max_iters: 20, learning_rate: 1e10, warmup_iters: 0, grad_clip: 0 });
    await expect(fresh).rejects.toThrow(/^training diverged at iteration \d+ \(a gradient norm of (NaN|Infinity)\) and nothing was saved; lower --learning_rate or set --grad_clip=1\.0 and start again$/);
  });

  it('saves no weights on Ctrl-C that a step has just made diverge', async () => {
    const { train } = await import('../ts/index.ts');
    const outDir = join(work, 'out-diverge-stop');
    await train({ ...small, out_dir: outDir, max_iters: 2, eval_interval: 2 });
    const saved = readFileSync(join(outDir, 'model.safetensors'));
    const stop = new AbortController();
    const messages: string[] = [];
    const onLog = (event: { kind: string; message: string; iter?: number }) => {
      messages.push(event.message);
      if (event.kind === 'iter' && event.iter === 2) stop.abort();
    };
    const options = { ...small, out_dir: outDir, init_from: 'resume', max_iters: 20, eval_interval: 100, learning_rate: 1e10, warmup_iters: 0 };
    const result = await train(options, { signal: stop.signal, onLog });
    expect(result).toMatchObject({ stopped: true, iter_num: 2 });
    expect(messages.find((m) => m.startsWith('the weights of iteration 2'))).toMatch(
      new RegExp(`^the weights of iteration 2 give a val loss of (NaN|Infinity) \\(the run diverged\\): the checkpoint already in ${outDir} stays; lower --learning_rate before resuming it$`),
    );
    expect(readFileSync(join(outDir, 'model.safetensors')).equals(saved)).toBe(true);
  });

  it('saves no weights whose evaluated loss is not finite, even with always_save_checkpoint', async () => {
    const { train } = await import('../ts/index.ts');
    const outDir = join(work, 'out-nan');
    await train({ ...small, out_dir: outDir, max_iters: 2, eval_interval: 2 });
    // The last weight of the file becomes NaN, as a diverged run's would.
    const weights = join(outDir, 'model.safetensors');
    const clean = readFileSync(weights);
    const poisoned = Buffer.from(clean);
    poisoned.writeFloatLE(NaN, poisoned.length - 4);
    writeFileSync(weights, poisoned);
    const run = train({ ...small, out_dir: outDir, init_from: 'resume', max_iters: 4, eval_interval: 2, always_save_checkpoint: true });
    await expect(run).rejects.toThrow('the weights this run starts from give an evaluated loss that is not finite at iteration 2, its first; start from other weights');

    // Weights a step made non-finite, evaluated before the next step's check: not saved over the checkpoint.
    writeFileSync(weights, clean);
    const diverging = train({ ...small, out_dir: outDir, init_from: 'resume', max_iters: 20, eval_interval: 3, learning_rate: 1e10, warmup_iters: 0 });
    await expect(diverging).rejects.toThrow(`training diverged at iteration 3 (an evaluated loss that is not finite); the checkpoint of iteration 2 in ${outDir} is kept`);
    expect(readFileSync(weights).equals(clean)).toBe(true);
    expect(JSON.parse(readFileSync(join(outDir, 'ckpt.json'), 'utf8')).iter_num).toBe(2);
  });

  it('resumes a checkpoint into the run it came from: the same batches, dropout masks, losses and weights', async () => {
    const { train } = await import('../ts/index.ts');
    type Event = { kind: string; iter?: number; loss?: number; val_loss?: number };
    const options = { ...small, dropout: 0.2, gradient_accumulation_steps: 2, eval_interval: 3 };
    const whole: Event[] = [];
    const wholeDir = join(work, 'out-whole');
    await train({ ...options, out_dir: wholeDir, max_iters: 6 }, { onLog: (event) => whole.push(event) });
    // The first half saves at iteration 3 and ends; its resumption evaluates at 3 again and trains on.
    const halvesDir = join(work, 'out-halves');
    await train({ ...options, out_dir: halvesDir, max_iters: 3 });
    const resumed: Event[] = [];
    await train({ ...options, out_dir: halvesDir, max_iters: 6, init_from: 'resume' }, { onLog: (event) => resumed.push(event) });

    const figures = (events: Event[]) =>
      events.filter((e) => (e.kind === 'iter' || e.kind === 'eval') && e.iter! >= 3).map(({ kind, iter, loss, val_loss }) => ({ kind, iter, loss, val_loss }));
    expect(figures(resumed).map((e) => `${e.kind} ${e.iter}`)).toEqual(['eval 3', 'iter 3', 'iter 4', 'iter 5', 'eval 6', 'iter 6']);
    expect(figures(resumed)).toEqual(figures(whole));
    for (const file of ['model.safetensors', 'optimizer.safetensors']) {
      expect(readFileSync(join(halvesDir, file)).equals(readFileSync(join(wholeDir, file))), file).toBe(true);
    }
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
