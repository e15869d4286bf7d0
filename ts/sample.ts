// Text generation from a trained checkpoint or GPT-2 weights, as nanoGPT's sample.py.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadCheckpointWeights, readCheckpointInfo, readCheckpointVocabulary, readMetaPkl } from './checkpoint.ts';
import { noEffectNotes, resolveConfig, sampleSchema, type SampleConfig } from './config.ts';
import { CharTokenizer, readMeta, type Meta } from './data.ts';
import { Engine, type Dtype, type EngineChoice } from './engine.ts';
import { firstLine, UserError } from './errors.ts';
import { loadHfModel } from './pretrained.ts';
import { Rng } from './rng.ts';
import { gpt2Tokenizer, gpt2VocabSize } from './tokenizer.ts';

export interface SampleOptions {
  /** Receives the set-up lines sample.py prints (notes, which vocabulary); nothing is printed. */
  onLog?: (line: string) => void;
}

/** The samples (prompt included), `num_samples` of them. */
export async function sample(overrides: Partial<SampleConfig> = {}, options: SampleOptions = {}): Promise<string[]> {
  const { config, engine, tokenizer, prompt, seeds } = await openSampling(overrides, options);
  // One batch: on the CPU the samples decode together, each from its own seed.
  const sequences = engine.generateBatch(prompt, Uint32Array.from(seeds), config.max_new_tokens, config.temperature, config.top_k);
  return sequences.map((tokens) => tokenizer.decode(tokens));
}

/** A piece of a sample's text as it is generated: the prompt first, then the new text token by token. */
export interface TextChunk {
  /** Which sample, from 0 to num_samples - 1. */
  sample: number;
  text: string;
}

/**
 * `sample`, streamed: the samples' text arrives in chunks as the engine generates it. All samples decode together as
 * one batch (as in `sample`), so their chunks interleave: each sample's prompt first, then at every step a chunk per
 * sample that has new text. Each sample's chunks join into the text `sample` returns for the same seed.
 */
export async function* generate(overrides: Partial<SampleConfig> = {}, options: SampleOptions = {}): AsyncGenerator<TextChunk> {
  const { config, engine, tokenizer, prompt, seeds } = await openSampling(overrides, options);
  engine.startSampling(prompt, Uint32Array.from(seeds), config.temperature, config.top_k);
  const tokens = seeds.map(() => Array.from(prompt));
  const emitted = tokens.map((sequence) => tokenizer.decode(sequence));
  for (const [k, text] of emitted.entries()) yield { sample: k, text };
  for (let i = 0; i < config.max_new_tokens; i++) {
    const next = engine.nextTokens();
    for (const [k, sequence] of tokens.entries()) {
      sequence.push(next[k]);
      // A GPT-2 token can end inside a UTF-8 character: wait for the rest before emitting it.
      const text = tokenizer.decode(sequence);
      if (text.endsWith('\uFFFD') && i + 1 < config.max_new_tokens) continue;
      yield { sample: k, text: text.slice(emitted[k].length) };
      emitted[k] = text;
    }
  }
}

/** What `sample` and `generate` share: the model, its vocabulary, the encoded prompt and each sample's seed. */
async function openSampling(overrides: Partial<SampleConfig>, options: SampleOptions) {
  const config = resolveConfig(sampleSchema, overrides);
  const log = options.onLog ?? (() => {});
  for (const note of noEffectNotes(config, overrides)) log(note);
  if (config.num_samples < 1) throw new UserError(`num_samples must be at least 1, got ${config.num_samples}`);
  if (!Number.isInteger(config.max_new_tokens) || config.max_new_tokens < 0) {
    throw new UserError(`max_new_tokens must be a whole number of at least 0, got ${config.max_new_tokens}`);
  }
  if (config.top_k < 0) throw new UserError(`top_k must be 0 (all tokens) or more, got ${config.top_k}`);
  if (config.temperature <= 0) {
    throw new UserError(`temperature must be above 0 (there is no greedy mode), got ${config.temperature}; try --temperature=0.1`);
  }
  Engine.checkDevice(config.device, config.engine as EngineChoice);

  let engine: Engine;
  let meta: Meta | undefined;
  let metaPath = '';
  if (config.init_from === 'resume') {
    const checkpoint = readCheckpointInfo(config.out_dir);
    const modelArgs = { ...checkpoint.model_args, dropout: 0 };
    engine = loadCheckpointWeights(config.out_dir, modelArgs, config.device, config.engine as EngineChoice);
    // A checkpoint carries its character vocabulary; an older one, or nanoGPT's, leaves it with the dataset it was
    // trained on (meta.json, or the meta.pkl of nanoGPT's prepare.py), in the data_dir it was trained with.
    const saved = readCheckpointVocabulary(config.out_dir);
    const dataDir = overrides.data_dir ?? (typeof checkpoint.config.data_dir === 'string' ? checkpoint.config.data_dir : config.data_dir);
    const datasetDir = join(dataDir, String(checkpoint.config.dataset));
    if (saved) {
      ({ meta, path: metaPath } = saved);
    } else if ((meta = readMeta(datasetDir))) {
      metaPath = join(datasetDir, 'meta.json');
    } else if ((meta = readMetaPkl(datasetDir))) {
      metaPath = join(datasetDir, 'meta.pkl');
    } else if (modelArgs.vocab_size < gpt2VocabSize) {
      throw new UserError(
        `the model's vocabulary has ${modelArgs.vocab_size} tokens, fewer than GPT-2's, and neither ${config.out_dir} nor ${datasetDir} holds it (meta.json or meta.pkl); point --data_dir at the data it was trained on`,
      );
    }
  } else {
    engine = await loadHfModel(config.init_from, 0, config.device, config.engine as EngineChoice, log);
  }

  if (config.device !== 'cpu') engine.setPrecision(config.dtype as Dtype);
  engine.checkMemory(1, 'sample');

  // As sample.py: a character vocabulary only where the checkpoint's dataset has one, GPT-2's otherwise.
  let tokenizer: { encode(text: string): ArrayLike<number>; decode(ids: ArrayLike<number>): string };
  if (meta) {
    log(`Loading meta from ${metaPath}...`);
    tokenizer = CharTokenizer.fromMeta(meta);
  } else {
    log('No meta.json found, assuming GPT-2 encodings...');
    tokenizer = gpt2Tokenizer;
  }

  const prompt = Uint32Array.from(tokenizer.encode(readPrompt(config.start)));
  if (prompt.length === 0) throw new UserError('the prompt is empty; pass some text with --start=<text>');

  // One seeded stream gives each sample its own seed: samples differ, runs repeat.
  const rng = new Rng(config.seed);
  const seeds = Array.from({ length: config.num_samples }, () => rng.nextUint32());
  return { config, engine, tokenizer, prompt, seeds };
}

function readPrompt(start: string): string {
  if (!start.startsWith('FILE:')) return start;
  const path = start.slice('FILE:'.length);
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw new UserError(`cannot read the prompt file ${path} (${firstLine(err)}); fix the path in --start=FILE:<path>`);
  }
}
