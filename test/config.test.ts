import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { defaultsOf, describeKeys, findConfigFile, noEffectNotes, parseArgs, resolveConfig, sampleSchema, trainSchema } from '../ts/config.ts';

const quiet = () => {};
const parse = (...args: string[]) => parseArgs(trainSchema, args, quiet);

describe('defaults', () => {
  it("match train.py's, plus the keys nanoGPT hard-codes", () => {
    const d = defaultsOf(trainSchema);
    expect(d.gradient_accumulation_steps).toBe(40);
    expect(d.learning_rate).toBe(6e-4);
    expect(d.max_iters).toBe(600000);
    expect(d.bias).toBe(false);
    expect(d.always_save_checkpoint).toBe(true);
    expect(d.seed).toBe(1337);
    // train.py's globals, data_dir (nanoGPT hard-codes data/), engine (which build of the engine runs it),
    // ddp_timeout (torch's process group timeout) and zero_stage (llm.c's ZeRO stage, off).
    expect(Object.keys(d)).toHaveLength(38);
    expect(d.ddp_timeout).toBe(600);
    expect(d.zero_stage).toBe(0);
    expect(d.engine).toBe('auto');
  });

  it('of sample match sample.py', () => {
    const d = defaultsOf(sampleSchema);
    expect(d).toMatchObject({ start: '\n', num_samples: 10, max_new_tokens: 500, temperature: 0.8, top_k: 200, seed: 1337 });
  });

  it('are all listed in --help, in a form the parser accepts back', async () => {
    for (const schema of [trainSchema, sampleSchema]) {
      const help = describeKeys(schema);
      for (const key of Object.keys(schema)) expect(help).toContain(`--${key}=`);
      const flags = help.split('\n').map((line) => line.trim().split(/\s+/)[0]);
      expect(resolveConfig(schema, await parseArgs(schema, flags, quiet))).toEqual(defaultsOf(schema));
    }
  });
});

describe('--key=value', () => {
  it('parses by the type of the default and logs like configurator.py', async () => {
    const lines: string[] = [];
    const overrides = await parseArgs(trainSchema, ['--batch_size=32', '--dropout=0', '--learning_rate=1e-3', '--compile=False', '--out_dir=run1'], (line) => lines.push(line));
    expect(overrides).toEqual({ batch_size: 32, dropout: 0, learning_rate: 1e-3, compile: false, out_dir: 'run1' });
    expect(lines).toEqual([
      'Overriding: batch_size = 32',
      'Overriding: dropout = 0.0',
      'Overriding: learning_rate = 0.001',
      'Overriding: compile = False',
      'Overriding: out_dir = run1',
    ]);
  });

  it('accepts both spellings of booleans', async () => {
    expect(await parse('--bias=True', '--eval_only=true', '--decay_lr=false', '--compile=False')).toEqual({
      bias: true,
      eval_only: true,
      decay_lr: false,
      compile: false,
    });
  });

  it('strips one level of quotes from strings and keeps later "=" in the value', async () => {
    expect(await parse(`--out_dir='a b'`, '--wandb_run_name="x=y"')).toEqual({ out_dir: 'a b', wandb_run_name: 'x=y' });
    expect(await parseArgs(sampleSchema, ['--start="\\nROMEO:"', "--out_dir='\\n'"], quiet)).toEqual({ start: '\nROMEO:', out_dir: '\\n' });
  });

  it('lets later arguments win', async () => {
    expect(await parse('--batch_size=4', '--batch_size=8')).toEqual({ batch_size: 8 });
  });

  it('suggests nothing when no key is close', async () => {
    await expect(parse('--zzzzzz=1')).rejects.toThrow(/^unknown config key 'zzzzzz'; --help lists every key$/);
    await expect(parse('--lr=1e-3')).rejects.toThrow(/^unknown config key 'lr'; --help lists every key$/);
  });

  it('suggests the closest key for an unknown one', async () => {
    await expect(parse('--lerning_rate=1e-3')).rejects.toThrow("unknown config key 'lerning_rate'; did you mean 'learning_rate'?");
    await expect(parse('--n_embed=64')).rejects.toThrow("did you mean 'n_embd'?");
  });

  it('names key, expected type and value on a type mismatch', async () => {
    await expect(parse('--max_iters=1.5')).rejects.toThrow("--max_iters expects an integer, got '1.5'");
    await expect(parse('--learning_rate=fast')).rejects.toThrow("--learning_rate expects a number, got 'fast'");
    await expect(parse('--bias=yes')).rejects.toThrow("--bias expects True or False, got 'yes'");
    await expect(parse('--bias=1')).rejects.toThrow('--bias expects True or False');
  });

  it('rejects a flag without a value and a value without --', async () => {
    await expect(parse('--batch_size')).rejects.toThrow('--batch_size has no value; write --batch_size=<value>');
    await expect(parse('batch_size=3')).rejects.toThrow('overrides are written --key=value');
  });

  it('errors are one line', async () => {
    const error = await parse('--max_iters=x').catch((err: Error) => err);
    expect(String((error as Error).message)).not.toContain('\n');
  });
});

describe('config files', () => {
  const dir = mkdtempSync(join(tmpdir(), 'nanogpt-config-'));

  it('load their default export, print their text, and are overridden by later arguments', async () => {
    const file = join(dir, 'small.ts');
    const text = "export default { batch_size: 4, dataset: 'shakespeare_char', dropout: 0.2 };\n";
    writeFileSync(file, text);
    const lines: string[] = [];
    const overrides = await parseArgs(trainSchema, [file, '--batch_size=16'], (line) => lines.push(line));
    expect(overrides).toEqual({ batch_size: 16, dataset: 'shakespeare_char', dropout: 0.2 });
    expect(lines).toEqual([`Overriding config with ${file}:`, text, 'Overriding: batch_size = 16']);
  });

  it('are overridden by files that come later', async () => {
    const second = join(dir, 'second.ts');
    writeFileSync(second, 'export default { batch_size: 2 };\n');
    expect(await parse('--batch_size=16', second)).toEqual({ batch_size: 2 });
  });

  it('have their values type-checked', async () => {
    const file = join(dir, 'bad.ts');
    writeFileSync(file, 'export default { max_iters: 2.5 };\n');
    await expect(parse(file)).rejects.toThrow(`max_iters expects an integer, got 2.5 (in ${file})`);
  });

  it('have their keys checked', async () => {
    const file = join(dir, 'typo.ts');
    writeFileSync(file, 'export default { n_layers: 2 };\n');
    await expect(parse(file)).rejects.toThrow(`unknown config key 'n_layers' (in ${file}); did you mean 'n_layer'?`);
  });

  it('that do not parse name the place and the error', async () => {
    const file = join(dir, 'unclosed.ts');
    writeFileSync(file, 'export default { batch_size: 4 \n');
    await expect(parse(file)).rejects.toThrow(`cannot load config file ${file}: ${file}:2:0: Expected "}" but found end of file`);
  });

  it("in Python (nanoGPT's format) are refused with the way to write them, and the bundled config of the same name", async () => {
    const mine = join(dir, 'mine.py');
    writeFileSync(mine, 'batch_size = 4\n');
    await expect(parse(mine)).rejects.toThrow(
      `${mine} is Python: config files are TypeScript or JavaScript modules with nanoGPT's keys (export default { batch_size: 12 }); write it as mine.ts`,
    );
    const nanogpts = join(dir, 'train_shakespeare_char.py');
    writeFileSync(nanogpts, "out_dir = 'out-shakespeare-char'\n");
    await expect(parse(nanogpts)).rejects.toThrow(
      /write it as train_shakespeare_char\.ts; nanoGPT's train_shakespeare_char\.py is bundled as configs\/train_shakespeare_char\.ts: npx nanogpt-rs train train_shakespeare_char$/,
    );
  });

  it('that are missing name the path and list the bundled configs', async () => {
    await expect(parse('configs/nope.ts')).rejects.toThrow(
      'config file not found: configs/nope.ts; bundled configs (usable by name, e.g. train_gpt2): eval_gpt2.ts, eval_gpt2_large.ts, eval_gpt2_medium.ts, eval_gpt2_xl.ts, finetune_shakespeare.ts, train_gpt2.ts, train_shakespeare_char.ts',
    );
  });

  it("resolve as nanoGPT users type them: config/ or configs/, a bare name, nanoGPT's .py name", () => {
    const bundled = fileURLToPath(new URL('../configs/train_gpt2.ts', import.meta.url));
    for (const arg of ['config/train_gpt2.ts', 'configs/train_gpt2.ts', './config/train_gpt2.ts', 'train_gpt2', 'train_gpt2.ts', 'config/train_gpt2.py']) {
      expect(findConfigFile(arg), arg).toBe(bundled);
    }
    expect(findConfigFile('config/nope.ts')).toBeUndefined();
    expect(findConfigFile('nope')).toBeUndefined();
  });

  it('in the working directory win over bundled ones of the same path', async () => {
    const local = join(dir, 'configs');
    mkdirSync(local, { recursive: true });
    writeFileSync(join(local, 'train_gpt2.ts'), 'export default { batch_size: 3 };\n');
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      expect(findConfigFile('configs/train_gpt2.ts')).toBe(join(local, 'train_gpt2.ts'));
    } finally {
      process.chdir(cwd);
    }
  });

  it("include nanoGPT's train_shakespeare_char, found from any working directory", async () => {
    const overrides = await parse('configs/train_shakespeare_char.ts');
    expect(overrides).toEqual({
      out_dir: 'out-shakespeare-char',
      eval_interval: 250,
      eval_iters: 200,
      log_interval: 10,
      always_save_checkpoint: false,
      wandb_log: false,
      wandb_project: 'shakespeare-char',
      wandb_run_name: 'mini-gpt',
      dataset: 'shakespeare_char',
      gradient_accumulation_steps: 1,
      batch_size: 64,
      block_size: 256,
      n_layer: 6,
      n_head: 6,
      n_embd: 384,
      dropout: 0.2,
      learning_rate: 1e-3,
      max_iters: 5000,
      lr_decay_iters: 5000,
      min_lr: 1e-4,
      beta2: 0.99,
      warmup_iters: 100,
    });
  });
});

describe('resolveConfig', () => {
  it('merges checked overrides over the defaults (the library path)', () => {
    const config = resolveConfig(trainSchema, { batch_size: 3 });
    expect(config.batch_size).toBe(3);
    expect(config.block_size).toBe(1024);
    expect(() => resolveConfig(trainSchema, { batch_size: '3' } as never)).toThrow('batch_size expects an integer, got "3"');
    expect(() => resolveConfig(trainSchema, { batchsize: 3 } as never)).toThrow("did you mean 'batch_size'?");
  });
});

describe('noEffectNotes', () => {
  it('mentions only keys the user set that change nothing here', () => {
    const overrides = { backend: 'gloo', compile: true, dtype: 'bfloat16', wandb_log: true } as const;
    const notes = noEffectNotes(resolveConfig(trainSchema, overrides), overrides);
    // wandb_log does something (see telemetry.ts), so it gets no note.
    expect(notes).toHaveLength(3);
    expect(notes.join('\n')).toMatch(/backend.*compile.*dtype=bfloat16/s);
    expect(noEffectNotes(resolveConfig(trainSchema, {}), {})).toEqual([]);
  });
});
