// What a checkpoint folder holds, without a file system, so that the browser page writes and reads the same
// folders as the CLI (checkpoint.ts does the atomic file writes).
import type { ModelArgs } from './engine.ts';
import { firstLine, UserError } from './errors.ts';

export interface CheckpointInfo {
  model_args: ModelArgs;
  iter_num: number;
  best_val_loss: number;
  /** The training config (its `dataset` tells `sample` where the vocabulary is). */
  config: Record<string, unknown>;
}

export const checkpointFiles = {
  weights: 'model.safetensors',
  optimizer: 'optimizer.safetensors',
  info: 'ckpt.json',
} as const;

export function checkpointInfoText(info: CheckpointInfo): string {
  return `${JSON.stringify(info, null, 2)}\n`;
}

/** Parses and checks the text of ckpt.json, read from `path`. */
export function parseCheckpointInfo(text: string, path: string): CheckpointInfo {
  let info: CheckpointInfo;
  try {
    info = JSON.parse(text) as CheckpointInfo;
  } catch (err) {
    throw corruptCheckpoint(path, firstLine(err));
  }
  const args = info?.model_args;
  const fields = ['n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'] as const;
  if (typeof args !== 'object' || args === null) throw corruptCheckpoint(path, 'model_args is missing');
  const missing = fields.find((field) => !Number.isInteger(args[field]));
  if (missing) throw corruptCheckpoint(path, `model_args.${missing} is missing`);
  if (typeof info.iter_num !== 'number') throw corruptCheckpoint(path, 'iter_num is missing');
  if (typeof info.best_val_loss !== 'number') throw corruptCheckpoint(path, 'best_val_loss is missing');
  if (typeof info.config !== 'object' || info.config === null) throw corruptCheckpoint(path, 'config is missing');
  return info;
}

export function corruptCheckpoint(path: string, problem: string): UserError {
  return new UserError(`checkpoint ${path} is unusable: ${problem}; train again (init_from=scratch) or restore a backup`);
}
