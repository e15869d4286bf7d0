// `nanogpt-rs export`: a checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors), loadable with
// transformers' GPT2LMHeadModel.from_pretrained and by init_from=<folder> here.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { loadWithEngine, readCheckpointInfo, weightsPath } from './checkpoint.ts';
import { Engine, type EngineChoice } from './engine.ts';
import { replaceFileAtomic, writeFileAtomic } from './files.ts';

export interface ExportOptions {
  /** The checkpoint folder. */
  out_dir: string;
  /** The Hugging Face folder to write. */
  to: string;
  /** Which engine build reads and writes the weights (the WebAssembly one holds at most 4 GiB). */
  engine?: EngineChoice;
}

export function exportHf(options: ExportOptions, log: (line: string) => void = console.log): void {
  const checkpoint = readCheckpointInfo(options.out_dir);
  const weights = weightsPath(options.out_dir);
  const modelArgs = { ...checkpoint.model_args, dropout: 0 };
  const engine = loadWithEngine(options.out_dir, 'weights', () => Engine.fromSafetensorsFile(modelArgs, weights, 'cpu', options.engine ?? 'auto'));
  mkdirSync(options.to, { recursive: true });
  replaceFileAtomic(join(options.to, 'model.safetensors'), (temp) => engine.exportHfFile(temp));
  writeFileAtomic(join(options.to, 'config.json'), engine.hfConfig());
  log(`exported ${options.out_dir} (iteration ${checkpoint.iter_num}) as a Hugging Face GPT-2 to ${options.to}`);
}
