// A checkpoint is a folder (out_dir) holding nanoGPT's ckpt.pt split into three files:
//   model.safetensors      weights, named as nanoGPT's state dict
//   optimizer.safetensors  AdamW moments and step count
//   ckpt.json              { model_args, iter_num, best_val_loss, config }
// Each file is replaced atomically and ckpt.json goes last, so a crash mid-save leaves a loadable checkpoint.
// An out_dir of nanoGPT's own train.py holds ckpt.pt instead (and no ckpt.json); the engine reads it directly.
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  checkCheckpointInfo,
  checkpointFiles,
  checkpointInfoText,
  corruptCheckpoint,
  parseCheckpointInfo,
  type CheckpointInfo,
} from './checkpoint-info.ts';
import type { Meta } from './data.ts';
import { Engine, nanogptCheckpointInfoFile, pickleToJson, type EngineChoice, type ModelArgs } from './engine.ts';
import { firstLine, UserError } from './errors.ts';
import { replaceFileAtomic, writeFileAtomic } from './files.ts';

export type { CheckpointInfo } from './checkpoint-info.ts';

const { weights: weightsFile, optimizer: optimizerFile, info: infoFile } = checkpointFiles;
const nanogptFile = 'ckpt.pt';

/** nanoGPT's ckpt.pt when out_dir has one and none of ours (a run resumed here saves ours, which then wins). */
function nanogptCheckpoint(outDir: string): string | undefined {
  const path = join(outDir, nanogptFile);
  return !existsSync(join(outDir, infoFile)) && existsSync(path) ? path : undefined;
}

export function saveCheckpoint(outDir: string, engine: Pick<Engine, 'saveWeightsFile' | 'saveOptimizerFile'>, info: CheckpointInfo): void {
  mkdirSync(outDir, { recursive: true });
  // The engine writes the tensors itself: a large model's would not fit in a Node.js Buffer.
  replaceFileAtomic(join(outDir, weightsFile), (temp) => engine.saveWeightsFile(temp));
  replaceFileAtomic(join(outDir, optimizerFile), (temp) => engine.saveOptimizerFile(temp));
  writeFileAtomic(join(outDir, infoFile), checkpointInfoText(info));
}

/** Reads and checks ckpt.json, the file that says a complete checkpoint is there. */
export function readCheckpointInfo(outDir: string): CheckpointInfo {
  const nanogpt = nanogptCheckpoint(outDir);
  const path = nanogpt ?? join(outDir, infoFile);
  if (!existsSync(path)) {
    throw new UserError(`no checkpoint in ${outDir} (${infoFile} is missing), nor nanoGPT's ${nanogptFile}; train one first or point --out_dir at one`);
  }
  let read: CheckpointInfo | string;
  try {
    read = nanogpt ? nanogptCheckpointInfoFile(nanogpt) : readFileSync(path, 'utf8');
  } catch (err) {
    if (err instanceof UserError) throw err;
    throw corruptCheckpoint(path, firstLine(err));
  }
  return typeof read === 'string' ? parseCheckpointInfo(read, path) : checkCheckpointInfo(read, path);
}

/** A model with the checkpoint's weights (`modelArgs`: its model_args, any dropout), from either kind of out_dir. */
export function loadCheckpointWeights(outDir: string, modelArgs: ModelArgs, device: string, engine: EngineChoice): Engine {
  const nanogpt = nanogptCheckpoint(outDir);
  if (nanogpt) return loadFile(nanogpt, () => Engine.fromNanogptCheckpointFile(modelArgs, nanogpt, device, engine));
  const weights = weightsPath(outDir);
  return loadWithEngine(outDir, 'weights', () => Engine.fromSafetensorsFile(modelArgs, weights, device, engine));
}

/** Restores the checkpoint's AdamW state into `engine`'s configured optimizer, from either kind of out_dir. */
export function loadCheckpointOptimizer(outDir: string, engine: Engine): void {
  const nanogpt = nanogptCheckpoint(outDir);
  if (nanogpt) return loadFile(nanogpt, () => engine.loadNanogptOptimizerFile(nanogpt));
  const state = optimizerStatePath(outDir);
  loadWithEngine(outDir, 'optimizer', () => engine.loadOptimizerFile(state));
}

/**
 * nanoGPT's character vocabulary, `meta.pkl` (a pickle of {vocab_size, itos, stoi}), for a dataset prepared by
 * nanoGPT's own prepare.py; undefined when there is none. The engine's pickle reader runs nothing from the file.
 */
export function readMetaPkl(datasetDir: string): Meta | undefined {
  const path = join(datasetDir, 'meta.pkl');
  if (!existsSync(path)) return undefined;
  try {
    const meta = JSON.parse(pickleToJson(readFileSync(path))) as Meta;
    if (!Number.isInteger(meta.vocab_size) || typeof meta.itos !== 'object') throw new Error('missing vocab_size or itos');
    return meta;
  } catch (err) {
    if (err instanceof UserError) throw err;
    throw new UserError(`${path} is not a nanoGPT vocabulary (${firstLine(err)}); run \`nanogpt-rs prepare\` for this dataset`);
  }
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
  return loadFile(join(outDir, file === 'weights' ? weightsFile : optimizerFile), load);
}

function loadFile<T>(path: string, load: () => T): T {
  try {
    return load();
  } catch (err) {
    // Errors that already say what to do (e.g. an engine build that is missing) are not about the file.
    if (err instanceof UserError) throw err;
    throw new UserError(`cannot load checkpoint ${path}: ${firstLine(err)}`);
  }
}

function partPath(outDir: string, file: string): string {
  const path = join(outDir, file);
  if (!existsSync(path)) throw corruptCheckpoint(path, 'the file is missing');
  return path;
}
