// Text generation from a trained checkpoint or GPT-2 weights, as nanoGPT's sample.py (spec section 3).
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadWithEngine, readCheckpointInfo, weightsPath } from './checkpoint.ts';
import { noEffectNotes, resolveConfig, sampleSchema, type SampleConfig } from './config.ts';
import { CharTokenizer, readMeta, type Meta } from './data.ts';
import { Engine, type Dtype, type EngineChoice } from './engine.ts';
import { firstLine, UserError } from './errors.ts';
import { loadHfModel } from './pretrained.ts';
import { Rng } from './rng.ts';
import { gpt2Tokenizer } from './tokenizer.ts';

/** Prints each sample (prompt included) followed by a line of dashes, and returns them. */
export async function sample(overrides: Partial<SampleConfig> = {}): Promise<string[]> {
  const config = resolveConfig(sampleSchema, overrides);
  for (const note of noEffectNotes(config, overrides)) console.log(note);
  if (config.temperature <= 0) {
    throw new UserError(`temperature must be above 0 (there is no greedy mode), got ${config.temperature}; try --temperature=0.1`);
  }

  let engine: Engine;
  let meta: Meta | undefined;
  let metaPath = '';
  if (config.init_from === 'resume') {
    const checkpoint = readCheckpointInfo(config.out_dir);
    const weights = weightsPath(config.out_dir);
    const modelArgs = { ...checkpoint.model_args, dropout: 0 };
    engine = loadWithEngine(config.out_dir, 'weights', () => Engine.fromSafetensorsFile(modelArgs, weights, config.device, config.engine as EngineChoice));
    // A checkpoint may carry its vocabulary (the browser page's do); else it is the dataset's.
    const vocabularyDir = [config.out_dir, join(config.data_dir, String(checkpoint.config.dataset))].find((dir) => existsSync(join(dir, 'meta.json')));
    if (vocabularyDir) {
      metaPath = join(vocabularyDir, 'meta.json');
      meta = readMeta(vocabularyDir);
    }
  } else {
    engine = await loadHfModel(config.init_from, 0, config.device, config.engine as EngineChoice);
  }

  if (config.device !== 'cpu') engine.setPrecision(config.dtype as Dtype);
  engine.checkMemory(1, 'sample');

  // As sample.py: a character vocabulary only where the checkpoint's dataset has one, GPT-2's otherwise.
  let tokenizer: { encode(text: string): ArrayLike<number>; decode(ids: ArrayLike<number>): string };
  if (meta) {
    console.log(`Loading meta from ${metaPath}...`);
    tokenizer = CharTokenizer.fromMeta(meta);
  } else {
    console.log('No meta.json found, assuming GPT-2 encodings...');
    tokenizer = gpt2Tokenizer;
  }

  const prompt = tokenizer.encode(readPrompt(config.start));
  if (prompt.length === 0) throw new UserError('the prompt is empty; pass some text with --start=<text>');

  // One seeded stream gives each sample its own seed: samples differ, runs repeat.
  const rng = new Rng(config.seed);
  const samples: string[] = [];
  for (let k = 0; k < config.num_samples; k++) {
    const tokens = engine.generate(Uint32Array.from(prompt), config.max_new_tokens, config.temperature, config.top_k, rng.nextUint32());
    const text = tokenizer.decode(tokens);
    console.log(text);
    console.log('---------------');
    samples.push(text);
  }
  return samples;
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
