// `nanogpt-rs export`: a checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors), loadable with
// transformers' GPT2LMHeadModel.from_pretrained and by init_from=<folder> here; or, with `--to=nanogpt`, as nanoGPT's
// own ckpt.pt, which its sample.py and train.py (init_from='resume') load.
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { loadCheckpointOptimizer, loadCheckpointWeights, readCheckpointInfo } from './checkpoint.ts';
import { type EngineChoice } from './engine.ts';
import { UserError } from './errors.ts';
import { replaceFileAtomic, writeFileAtomic } from './files.ts';

export interface ExportOptions {
  /** The checkpoint folder. */
  out_dir: string;
  /** The Hugging Face folder to write, or `nanogpt` for nanoGPT's ckpt.pt at `out`. */
  to: string;
  /** With `to: 'nanogpt'`: the ckpt.pt to write. */
  out?: string;
  /** Which engine build reads and writes the weights (the WebAssembly one holds at most 4 GiB). */
  engine?: EngineChoice;
  /** Receives the line that says what was written (the CLI prints it; the library prints nothing). */
  log?: (line: string) => void;
}

export function exportHf(options: ExportOptions): void {
  const log = options.log ?? (() => {});
  if (options.to === 'nanogpt') return exportNanogpt(options, log);
  const checkpoint = readCheckpointInfo(options.out_dir);
  const modelArgs = { ...checkpoint.model_args, dropout: 0 };
  const engine = loadCheckpointWeights(options.out_dir, modelArgs, 'cpu', options.engine ?? 'auto');
  mkdirSync(options.to, { recursive: true });
  replaceFileAtomic(join(options.to, 'model.safetensors'), (temp) => engine.exportHfFile(temp));
  writeFileAtomic(join(options.to, 'config.json'), engine.hfConfig());
  log(`exported ${options.out_dir} (iteration ${checkpoint.iter_num}) as a Hugging Face GPT-2 to ${options.to}`);
}

/** The weights, the AdamW state and the run's info as nanoGPT's ckpt.pt, so that nanoGPT resumes where this run stopped. */
function exportNanogpt(options: ExportOptions, log: (line: string) => void): void {
  const out = options.out;
  if (!out) throw new UserError('export --to=nanogpt needs --out=<path of the ckpt.pt to write>, e.g. --out=out-nanogpt/ckpt.pt');
  const checkpoint = readCheckpointInfo(options.out_dir);
  const engine = loadCheckpointWeights(options.out_dir, checkpoint.model_args, 'cpu', options.engine ?? 'auto');
  const setting = (key: string, fallback: number) => (typeof checkpoint.config[key] === 'number' ? (checkpoint.config[key] as number) : fallback);
  // nanoGPT's train.py defaults, for a config that lacks a key.
  engine.configureOptimizer({
    weight_decay: setting('weight_decay', 0.1),
    beta1: setting('beta1', 0.9),
    beta2: setting('beta2', 0.95),
    grad_clip: setting('grad_clip', 1.0),
  });
  loadCheckpointOptimizer(options.out_dir, engine);
  mkdirSync(dirname(out), { recursive: true });
  replaceFileAtomic(out, (temp) => engine.saveNanogptCheckpointFile(temp, checkpoint));
  log(`exported ${options.out_dir} (iteration ${checkpoint.iter_num}) as nanoGPT's ckpt.pt to ${out}`);
  if (checkpoint.model_args.gelu === 'tanh') {
    log("note: this model computes GELU's tanh approximation (GPT-2's); nanoGPT's model.py computes the exact GELU");
  }
}
