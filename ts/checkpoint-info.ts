// What a checkpoint folder holds, without a file system, so that the browser page writes and reads the same
// folders as the CLI (checkpoint.ts does the atomic file writes).
import type { CheckpointInfo } from './engine-types.ts';
import { firstLine, UserError } from './errors.ts';

export type { CheckpointInfo } from './engine-types.ts';

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
  return checkCheckpointInfo(info, path);
}

/** Checks the fields of a checkpoint's info, read from `path`, that training and sampling rely on. */
export function checkCheckpointInfo(info: CheckpointInfo, path: string): CheckpointInfo {
  const args = info?.model_args;
  const fields = ['n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'] as const;
  if (typeof args !== 'object' || args === null) throw corruptCheckpoint(path, 'model_args is missing');
  const missing = fields.find((field) => !Number.isInteger(args[field]));
  if (missing) throw corruptCheckpoint(path, `model_args.${missing} is missing`);
  if (typeof info.iter_num !== 'number') throw corruptCheckpoint(path, 'iter_num is missing');
  if (typeof info.config !== 'object' || info.config === null) throw corruptCheckpoint(path, 'config is missing');
  // JSON has no NaN: a run saved at a val loss that was not a number (it diverged) wrote null, read as no best yet.
  if ((info.best_val_loss as number | null) === null) return { ...info, best_val_loss: Number.POSITIVE_INFINITY };
  if (typeof info.best_val_loss !== 'number') throw corruptCheckpoint(path, 'best_val_loss is missing');
  return info;
}

export function corruptCheckpoint(path: string, problem: string): UserError {
  return new UserError(`checkpoint ${path} is unusable: ${problem}; train again (init_from=scratch) or restore a backup`);
}
