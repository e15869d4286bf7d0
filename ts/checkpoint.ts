// A checkpoint is a folder (out_dir) holding nanoGPT's ckpt.pt split into three files:
//   model.safetensors      weights, named as nanoGPT's state dict
//   optimizer.safetensors  AdamW moments and step count
//   ckpt.json              { model_args, iter_num, best_val_loss, config }
// Each file is replaced atomically and ckpt.json goes last, so a crash mid-save leaves a loadable checkpoint.
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkpointFiles, checkpointInfoText, corruptCheckpoint, parseCheckpointInfo, type CheckpointInfo } from './checkpoint-info.ts';
import type { Engine } from './engine.ts';
import { firstLine, UserError } from './errors.ts';
import { replaceFileAtomic, writeFileAtomic } from './files.ts';

export type { CheckpointInfo } from './checkpoint-info.ts';

const { weights: weightsFile, optimizer: optimizerFile, info: infoFile } = checkpointFiles;

export function saveCheckpoint(outDir: string, engine: Pick<Engine, 'saveWeightsFile' | 'saveOptimizerFile'>, info: CheckpointInfo): void {
  mkdirSync(outDir, { recursive: true });
  // The engine writes the tensors itself: a large model's would not fit in a Node.js Buffer.
  replaceFileAtomic(join(outDir, weightsFile), (temp) => engine.saveWeightsFile(temp));
  replaceFileAtomic(join(outDir, optimizerFile), (temp) => engine.saveOptimizerFile(temp));
  writeFileAtomic(join(outDir, infoFile), checkpointInfoText(info));
}

/** Reads and checks ckpt.json, the file that says a complete checkpoint is there. */
export function readCheckpointInfo(outDir: string): CheckpointInfo {
  const path = join(outDir, infoFile);
  if (!existsSync(path)) {
    throw new UserError(`no checkpoint in ${outDir} (${infoFile} is missing); train one first or point --out_dir at one`);
  }
  return parseCheckpointInfo(readFileSync(path, 'utf8'), path);
}

/** The path of the checkpoint's weights, checked to exist. */
export function weightsPath(outDir: string): string {
  return partPath(outDir, weightsFile);
}

/** The path of the checkpoint's optimizer state, checked to exist. */
export function optimizerStatePath(outDir: string): string {
  return partPath(outDir, optimizerFile);
}

/**
 * Runs an engine call on a checkpoint file, turning its failure into a one-line error. The engine's own message
 * carries the fix: it may be about the bytes (a damaged file) or about the engine (not built).
 */
export function loadWithEngine<T>(outDir: string, file: 'weights' | 'optimizer', load: () => T): T {
  try {
    return load();
  } catch (err) {
    // Errors that already say what to do (e.g. an engine build that is missing) are not about the file.
    if (err instanceof UserError) throw err;
    const path = join(outDir, file === 'weights' ? weightsFile : optimizerFile);
    throw new UserError(`cannot load checkpoint ${path}: ${firstLine(err)}`);
  }
}

function partPath(outDir: string, file: string): string {
  const path = join(outDir, file);
  if (!existsSync(path)) throw corruptCheckpoint(path, 'the file is missing');
  return path;
}
