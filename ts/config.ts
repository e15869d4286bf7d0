// Typed defaults for `train` and `sample`, and nanoGPT's "poor man's configurator": config files and
// `--key=value` overrides applied left to right. Unlike configurator.py, values are checked against the type of
// the default here, with one-line errors that say how to fix them.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { defaultDevice, type Dtype, type EngineChoice } from './engine.ts';
import { cliCommand, firstLine, UserError } from './errors.ts';

import {
  defaultsOf,
  sampleKeys,
  trainKeys,
  type ConfigOf,
  type Kind,
  type KeySpec,
  type KindValue,
  type Schema,
} from './schema.ts';

export { defaultsOf, type ConfigOf, type SampleConfig, type TrainConfig } from './schema.ts';

/** The keys with this machine's default device: cuda where a GPU and the CUDA build are present. */
export const trainSchema = withDefaultDevice(trainKeys);
export const sampleSchema = withDefaultDevice(sampleKeys);

/** `bench`'s options (nanoGPT's bench.py), GPT-2 124M at batch 12 x 1024 by default. */
export interface BenchOptions {
  batch_size: number;
  block_size: number;
  n_layer: number;
  n_head: number;
  n_embd: number;
  vocab_size: number;
  bias: boolean;
  /** Random batches from data/<dataset>/train.bin instead of one fixed batch of random ids. */
  real_data: boolean;
  dataset: string;
  data_dir: string;
  device: string;
  /** Which engine build runs it (see `--engine` of train). */
  engine: EngineChoice;
  dtype: Dtype;
  seed: number;
  /** Burn-in steps (not timed), then timed steps: bench.py's 10 and 20. */
  warmup: number;
  iters: number;
  /** Also time the phases of every timed step (synchronising between them). */
  profile: boolean;
}

export const benchDefaults: BenchOptions = {
  batch_size: 12,
  block_size: 1024,
  n_layer: 12,
  n_head: 12,
  n_embd: 768,
  vocab_size: 50304,
  bias: false,
  real_data: false,
  dataset: 'openwebtext',
  data_dir: 'data',
  device: defaultDevice(),
  engine: 'auto',
  dtype: 'bfloat16',
  seed: 1337,
  warmup: 10,
  iters: 20,
  profile: false,
};

/** `prepare openwebtext` / `prepare text`: nanoGPT's val fraction of documents and split seed. */
export const defaultValFraction = 0.0005;
export const defaultSplitSeed = 2357;

function withDefaultDevice<S extends { device: KeySpec<'str'> }>(keys: S): S {
  return { ...keys, device: { ...keys.device, default: defaultDevice() } };
}

/**
 * Processes command-line arguments like configurator.py, left to right, so later ones win: a bare argument is a
 * config file (a TS/JS module whose default export holds overrides), `--key=value` overrides one key.
 * Returns the overrides only; `resolveConfig` merges them over the defaults.
 */
export async function parseArgs<S extends Schema>(
  schema: S,
  args: readonly string[],
  log: (line: string) => void = console.log,
): Promise<Partial<ConfigOf<S>>> {
  const overrides: Record<string, unknown> = {};
  for (const arg of args) {
    if (!arg.includes('=')) {
      if (arg.startsWith('--')) throw new UserError(`${arg} has no value; write ${arg}=<value>`);
      const { path, text, values } = await loadConfigFile(arg);
      log(`Overriding config with ${path}:`);
      log(text);
      for (const [key, value] of Object.entries(values)) {
        checkKey(schema, key, ` (in ${path})`);
        overrides[key] = checkValue(key, schema[key], value, ` (in ${path})`);
      }
      continue;
    }
    if (!arg.startsWith('--')) throw new UserError(`cannot read argument '${arg}'; overrides are written --key=value`);
    const eq = arg.indexOf('=');
    const key = arg.slice(2, eq);
    checkKey(schema, key);
    const value = parseValue(key, schema[key], arg.slice(eq + 1));
    log(`Overriding: ${key} = ${formatValue(value, schema[key].kind)}`);
    overrides[key] = value;
  }
  return overrides as Partial<ConfigOf<S>>;
}

/** The full config: defaults, then `overrides` (checked, since library callers pass them unchecked). */
export function resolveConfig<S extends Schema>(schema: S, overrides: Partial<ConfigOf<S>>): ConfigOf<S> {
  const config: Record<string, unknown> = defaultsOf(schema);
  for (const [key, value] of Object.entries(overrides)) {
    checkKey(schema, key);
    config[key] = checkValue(key, schema[key], value, '');
  }
  return config as ConfigOf<S>;
}

/**
 * Notes for keys that are accepted for compatibility with nanoGPT's configs but change nothing on this engine.
 * Only keys the user set are mentioned, so a plain run stays quiet.
 */
export function noEffectNotes(
  config: { device: string; dtype: string; compile: boolean },
  overrides: object,
): string[] {
  const set = (key: string) => Object.hasOwn(overrides, key);
  const notes: string[] = [];
  if (set('backend')) notes.push('note: backend has no effect: data-parallel runs use NCCL on cuda and MPI on cpu');
  if (set('compile') && config.compile) notes.push('note: compile has no effect: the candle engine has no torch.compile step');
  if (set('dtype') && config.device === 'cpu' && config.dtype !== 'float32') {
    notes.push(`note: dtype=${config.dtype} has no effect on cpu: the engine computes in float32`);
  }
  return notes;
}

/** `--help` text: every key with its default, as it would be written on the command line. */
export function describeKeys(schema: Schema): string {
  const lines = Object.entries(schema).map(([key, spec]) => [`--${key}=${formatValue(spec.default, spec.kind)}`, spec.help]);
  const width = Math.max(...lines.map(([flag]) => flag.length));
  return lines.map(([flag, help]) => `  ${flag.padEnd(width)}  ${help}`).join('\n');
}

/** Python's spelling, which the parser accepts back: True/False, 1.0 for a float. */
function formatValue(value: unknown, kind?: Kind): string {
  if (typeof value === 'boolean') return value ? 'True' : 'False';
  if (kind === 'float' && Number.isInteger(value)) return (value as number).toFixed(1);
  if (typeof value === 'string' && /[\s"'\\]|^$/.test(value)) return JSON.stringify(value);
  return String(value);
}

function checkKey(schema: Schema, key: string, where = ''): void {
  if (Object.hasOwn(schema, key)) return;
  const near = closest(key, Object.keys(schema));
  const hint = near ? `did you mean '${near}'? (--help lists every key)` : '--help lists every key';
  throw new UserError(`unknown config key '${key}'${where}; ${hint}`);
}

const integerText = /^[+-]?\d+$/;
const floatText = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;

/** Reads a command-line value by the kind of the key's default; Python's spellings are accepted. */
function parseValue(key: string, spec: KeySpec, text: string): KindValue[Kind] {
  const wrongType = () =>
    new UserError(`--${key} expects ${kindName[spec.kind]}, got '${text}'; write e.g. --${key}=${formatValue(spec.default, spec.kind)}`);
  switch (spec.kind) {
    case 'int':
      if (!integerText.test(text)) throw wrongType();
      return checkValue(key, spec, Number(text), '');
    case 'float':
      if (!floatText.test(text)) throw wrongType();
      return Number(text);
    case 'bool':
      if (text === 'True' || text === 'true') return true;
      if (text === 'False' || text === 'false') return false;
      throw wrongType();
    case 'str':
      return checkValue(key, spec, unquote(text), '');
  }
}

/** Checks a value that is already typed (from a config file or the library API). */
function checkValue(key: string, spec: KeySpec, value: unknown, where: string): KindValue[Kind] {
  const ok =
    spec.kind === 'int' ? Number.isSafeInteger(value)
    : spec.kind === 'float' ? typeof value === 'number' && Number.isFinite(value)
    : typeof value === (spec.kind === 'bool' ? 'boolean' : 'string');
  if (!ok) {
    throw new UserError(`${key} expects ${kindName[spec.kind]}, got ${JSON.stringify(value)}${where}; e.g. ${key} = ${formatValue(spec.default, spec.kind)}`);
  }
  if (spec.choices && !spec.choices.includes(value as string)) {
    throw new UserError(`${key} must be one of ${spec.choices.join(', ')}, got '${value}'${where}`);
  }
  return value as KindValue[Kind];
}

const kindName: Record<Kind, string> = {
  int: 'an integer',
  float: 'a number',
  bool: 'True or False',
  str: 'a string',
};

/** Quotes are optional, as with literal_eval's fallback; double quotes also read escapes such as \n. */
function unquote(text: string): string {
  const quoted = text.length >= 2 && (text[0] === '"' || text[0] === "'") && text.at(-1) === text[0];
  if (!quoted) return text;
  if (text[0] === '"') {
    try {
      return JSON.parse(text) as string;
    } catch {
      // not valid JSON escapes: keep the text between the quotes as written
    }
  }
  return text.slice(1, -1);
}

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const bundledConfigs = join(packageRoot, 'configs');
const typeScriptExtensions = new Set(['.ts', '.mts', '.cts']);

/**
 * Where config argument `arg` is: a path relative to the working directory; else the same path inside the package,
 * where `config/` (nanoGPT's folder name) and `configs/` both mean the bundled configs; else a bare name
 * (`train_gpt2` or `train_gpt2.ts`) of a bundled config.
 */
export function findConfigFile(arg: string): string | undefined {
  const inPackage = arg.replace(/^\.\//, '');
  const candidates = [resolve(arg), resolve(packageRoot, inPackage)];
  // nanoGPT's configs are .py files; the bundled ones are the same settings as .ts.
  const bundled = (name: string) => [join(bundledConfigs, name), join(bundledConfigs, `${name.replace(/\.py$/, '')}.ts`)];
  const folder = /^configs?\//.exec(inPackage);
  if (folder) candidates.push(...bundled(inPackage.slice(folder[0].length)));
  if (!/[\\/]/.test(arg)) candidates.push(...bundled(arg));
  return candidates.find((candidate) => existsSync(candidate) && statSync(candidate).isFile());
}

/** The bundled config files, by name. */
export function bundledConfigNames(): string[] {
  return readdirSync(bundledConfigs).filter((name) => name.endsWith('.ts')).sort();
}

async function loadConfigFile(arg: string): Promise<{ path: string; text: string; values: Record<string, unknown> }> {
  const path = findConfigFile(arg);
  if (!path) {
    throw new UserError(`config file not found: ${arg}; bundled configs (usable by name, e.g. train_gpt2): ${bundledConfigNames().join(', ')}`);
  }
  if (extname(path) === '.py') {
    const name = basename(path, '.py');
    const bundled = bundledConfigNames().includes(`${name}.ts`) ? `; nanoGPT's ${name}.py is bundled as configs/${name}.ts: ${cliCommand} train ${name}` : '';
    throw new UserError(`${arg} is Python: config files are TypeScript or JavaScript modules with nanoGPT's keys (export default { batch_size: 12 }); write it as ${name}.ts${bundled}`);
  }
  let values: unknown;
  try {
    const url = pathToFileURL(path).href;
    // Config files are usually TypeScript: its loader comes in only now, scoped to this one import.
    const module = typeScriptExtensions.has(extname(path))
      ? await (await import('tsx/esm/api')).tsImport(url, import.meta.url)
      : await import(url);
    values = (module as { default?: unknown }).default;
    // A .ts file outside an ES-module package loads as CommonJS, where `export default` lands one level down.
    if ((values as { __esModule?: boolean } | undefined)?.__esModule) values = (values as { default?: unknown }).default;
  } catch (err) {
    // esbuild (through tsx) names a syntax error, with its place where it has one, on the line after its summary.
    const message = err instanceof Error ? err.message : String(err);
    const syntax = /^Transform failed with \d+ errors?:\n(.*)/.exec(message)?.[1].replace(/^.*?:(\d+:\d+): ERROR: /, `${arg}:$1: `);
    throw new UserError(`cannot load config file ${arg}: ${syntax?.trim() || firstLine(err)}`);
  }
  if (typeof values !== 'object' || values === null || Array.isArray(values)) {
    throw new UserError(`config file ${arg} must \`export default\` an object of overrides, e.g. { batch_size: 32 }`);
  }
  return { path: arg, text: readFileSync(path, 'utf8'), values: values as Record<string, unknown> };
}

/**
 * The key the user most likely meant, by Levenshtein distance; none when even the nearest needs more edits than a
 * typo would (a third of the word, at least 2), since a far key only misleads.
 */
function closest(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const candidate of candidates) {
    const distance = editDistance(word, candidate);
    if (distance < bestDistance) [best, bestDistance] = [candidate, distance];
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length];
}
