// A checkpoint is a folder (out_dir) holding nanoGPT's ckpt.pt split into three files:
//   model.safetensors      weights, named as nanoGPT's state dict
//   optimizer.safetensors  AdamW moments and step count
//   ckpt.json              { model_args, iter_num, best_val_loss, config }
//   meta.json              the character vocabulary of a model trained on characters (nanoGPT's meta.pkl), so
//                          that `sample` needs no dataset
// A save replaces them as one: it writes the new files beside the old ones (NAME.new; an empty meta.json.new stands
// for no vocabulary), commits them by creating `save.commit`, then moves each into place and removes the marker. A
// crash before the commit leaves the previous checkpoint whole; a crash after it leaves the new one, which readers
// find through the marker and the next save finishes moving.
// An out_dir of nanoGPT's own train.py holds ckpt.pt instead (and no ckpt.json); the engine reads it directly.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import {
  checkCheckpointInfo,
  checkpointFiles,
  checkpointInfoText,
  corruptCheckpoint,
  parseCheckpointInfo,
  type CheckpointInfo,
} from './checkpoint-info.ts';
import { parseMeta, prepareCommand, type Meta } from './data.ts';
import { Engine, nanogptCheckpointInfoFile, pickleToJson, type EngineChoice, type ModelArgs } from './engine.ts';
import { firstLine, UserError } from './errors.ts';
import { fsyncDirectory, replaceFileAtomic, writeFileAtomic } from './files.ts';

export type { CheckpointInfo } from './checkpoint-info.ts';

const { weights: weightsFile, optimizer: optimizerFile, info: infoFile } = checkpointFiles;
const vocabularyFile = 'meta.json';
const savedTogether = [weightsFile, optimizerFile, infoFile, vocabularyFile];
const commitMarker = 'save.commit';
const nanogptFile = 'ckpt.pt';

/** nanoGPT's ckpt.pt when out_dir has one and none of ours (a run resumed here saves ours, which then wins). */
function nanogptCheckpoint(outDir: string): string | undefined {
  const path = join(outDir, nanogptFile);
  return !existsSync(currentFile(outDir, infoFile)) && existsSync(path) ? path : undefined;
}

/**
 * Saves a checkpoint as one unit (see the top of this file). `vocabulary`: the character vocabulary of the data it
 * was trained on, or undefined for GPT-2 tokens (a meta.json left by an earlier run is then removed).
 */
export function saveCheckpoint(
  outDir: string,
  engine: Pick<Engine, 'saveWeightsFile' | 'saveOptimizerFile'>,
  info: CheckpointInfo,
  vocabulary?: Meta,
): void {
  mkdirSync(outDir, { recursive: true });
  finishInterruptedSave(outDir);
  writeFileAtomic(join(outDir, pending(vocabularyFile)), vocabulary ? JSON.stringify(vocabulary) : '');
  // The engine writes the tensors itself: a large model's would not fit in a Node.js Buffer.
  replaceFileAtomic(join(outDir, pending(weightsFile)), (temp) => engine.saveWeightsFile(temp));
  replaceFileAtomic(join(outDir, pending(optimizerFile)), (temp) => engine.saveOptimizerFile(temp));
  writeFileAtomic(join(outDir, pending(infoFile)), checkpointInfoText(info));
  writeFileAtomic(join(outDir, commitMarker), '');
  finishInterruptedSave(outDir);
}

function pending(file: string): string {
  return `${file}.new`;
}

/**
 * Completes a save that was committed but not moved into place, or drops one that never committed (with the
 * temporary files of a write cut short). Only a save calls it: a reader running beside a training run must not
 * touch the files that run is writing.
 */
function finishInterruptedSave(outDir: string): void {
  const committed = existsSync(join(outDir, commitMarker));
  for (const file of savedTogether) {
    const from = join(outDir, pending(file));
    if (!existsSync(from)) continue;
    if (committed && statSync(from).size > 0) {
      renameSync(from, join(outDir, file));
    } else {
      // An uncommitted file, or the empty stand-in of a checkpoint without a vocabulary, which removes the old one.
      if (committed) rmSync(join(outDir, file), { force: true });
      rmSync(from);
    }
  }
  // Temporary files of writes that a crash cut short, this version's and the earlier one's (NAME.tmp-PID).
  const temporary = [...savedTogether, ...savedTogether.map(pending), commitMarker].map((file) => `${file}.tmp-`);
  for (const name of readdirSync(outDir)) {
    if (temporary.some((prefix) => name.startsWith(prefix))) rmSync(join(outDir, name), { force: true });
  }
  if (!committed) return;
  fsyncDirectory(outDir);
  rmSync(join(outDir, commitMarker));
  fsyncDirectory(outDir);
}

/** Where a reader finds one of the checkpoint's files: the new one of a committed save not yet moved into place. */
function currentFile(outDir: string, file: string): string {
  const moving = join(outDir, pending(file));
  return existsSync(join(outDir, commitMarker)) && existsSync(moving) ? moving : join(outDir, file);
}

/**
 * Runs `read` on the current path of one of the checkpoint's files. A save running beside the reader may move that
 * file into place between the lookup and the read: then it is read again where it went.
 */
function readCurrent<T>(outDir: string, file: string, read: (path: string) => T): T {
  const path = currentFile(outDir, file);
  try {
    return read(path);
  } catch (err) {
    const moved = currentFile(outDir, file);
    if (moved === path || existsSync(path)) throw err;
    return read(moved);
  }
}

/** Whether out_dir holds a checkpoint, ours or nanoGPT's. */
export function hasCheckpoint(outDir: string): boolean {
  return existsSync(currentFile(outDir, infoFile)) || existsSync(join(outDir, nanogptFile));
}

/** The character vocabulary saved with the checkpoint in out_dir, if any. */
export function readCheckpointVocabulary(outDir: string): { meta: Meta; path: string } | undefined {
  const path = currentFile(outDir, vocabularyFile);
  const text = existsSync(path) ? readCurrent(outDir, vocabularyFile, (current) => readFileSync(current, 'utf8')) : '';
  return text === '' ? undefined : { meta: parseMeta(text, path, `delete it, and sample reads the vocabulary of the checkpoint's dataset`), path };
}

/** Reads and checks ckpt.json, the file that says a complete checkpoint is there. */
export function readCheckpointInfo(outDir: string): CheckpointInfo {
  const nanogpt = nanogptCheckpoint(outDir);
  const path = nanogpt ?? currentFile(outDir, infoFile);
  if (!existsSync(path)) {
    throw new UserError(`no checkpoint in ${outDir} (${infoFile} is missing), nor nanoGPT's ${nanogptFile}; train one first or point --out_dir at one`);
  }
  let read: CheckpointInfo | string;
  try {
    read = nanogpt ? nanogptCheckpointInfoFile(nanogpt) : readCurrent(outDir, infoFile, (current) => readFileSync(current, 'utf8'));
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
  return loadWithEngine(outDir, 'weights', (weights) => Engine.fromSafetensorsFile(modelArgs, weights, device, engine));
}

/** Restores the checkpoint's AdamW state into `engine`'s configured optimizer, from either kind of out_dir. */
export function loadCheckpointOptimizer(outDir: string, engine: Engine): void {
  const nanogpt = nanogptCheckpoint(outDir);
  if (nanogpt) return loadFile(nanogpt, () => engine.loadNanogptOptimizerFile(nanogpt));
  loadWithEngine(outDir, 'optimizer', (state) => engine.loadOptimizerFile(state));
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
    throw new UserError(`${path} is not a nanoGPT vocabulary (${firstLine(err)}); run \`${prepareCommand(dirname(path))}\` again`);
  }
}

/**
 * Runs an engine call on a checkpoint file, turning its failure into a one-line error. The engine's own message
 * carries the fix: it may be about the bytes (a damaged file) or about the engine (not built).
 */
export function loadWithEngine<T>(outDir: string, file: 'weights' | 'optimizer', load: (path: string) => T): T {
  const name = file === 'weights' ? weightsFile : optimizerFile;
  partPath(outDir, name);
  return readCurrent(outDir, name, (path) => loadFile(path, () => load(path)));
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
  const path = currentFile(outDir, file);
  if (!existsSync(path)) throw corruptCheckpoint(path, 'the file is missing');
  return path;
}
