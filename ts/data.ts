// Datasets as nanoGPT lays them out: `<data_dir>/<dataset>/{train,val}.bin` (headerless little-endian uint16 token
// ids) plus, for character-level data, `meta.json` with the vocabulary (nanoGPT's meta.pkl, as JSON); datasets
// without one are GPT-2 BPE encoded.
import { closeSync, copyFileSync, existsSync, fstatSync, mkdirSync, openSync, readFileSync, readSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cliCommand, firstLine, shellWord, UserError } from './errors.ts';
import { writeFileAtomic } from './files.ts';
import { batchRng, encodeCharDataset, sampleBatch, type Batch, type BatchUse, type Meta, type Split } from './tokens.ts';
import { gpt2Tokenizer, gpt2VocabSize } from './tokenizer.ts';

export { CharTokenizer, type Batch, type Meta, type Split } from './tokens.ts';

/** The vocabulary recorded next to a dataset, or undefined for datasets without one (GPT-2 BPE). */
export function readMeta(datasetDir: string): Meta | undefined {
  const path = join(datasetDir, 'meta.json');
  return existsSync(path) ? parseMeta(readFileSync(path, 'utf8'), path) : undefined;
}

/** A vocabulary's meta.json text, read from `path`, checked; `fix` says what to do if it is corrupt. */
export function parseMeta(text: string, path: string, fix = `run \`${prepareCommand(dirname(path))}\` again`): Meta {
  try {
    const meta = JSON.parse(text) as Meta;
    if (!Number.isInteger(meta.vocab_size) || typeof meta.itos !== 'object') throw new Error('missing vocab_size or itos');
    return meta;
  } catch (err) {
    throw new UserError(`${path} is corrupt (${firstLine(err)}); ${fix}`);
  }
}

export interface PrepareOptions {
  /** Folder holding the datasets; `data` under the working directory by default, like nanoGPT. */
  dataDir?: string;
  /** Receives what prepare.py prints (sizes, vocabulary); nothing is printed by default. */
  log?: (line: string) => void;
}

export interface PrepareResult {
  train_tokens: number;
  val_tokens: number;
  vocab_size: number;
}

const shakespeareUrl = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt';
const preparers: Record<string, (dir: string, log: (line: string) => void) => Promise<PrepareResult>> = {
  shakespeare_char: prepareShakespeareChar,
  shakespeare: prepareShakespeare,
};

/** The datasets `prepare` builds from their raw text (corpus.ts prepares OpenWebText and the user's own files). */
export const preparableDatasets = Object.keys(preparers);

/**
 * The command that prepares the dataset in `datasetDir`: `prepare NAME` for a dataset the CLI knows, else
 * `prepare text` of the user's own files, character-level where the folder has a vocabulary; with `--data_dir` where
 * that is not `data`.
 */
export function prepareCommand(datasetDir: string): string {
  const name = basename(datasetDir);
  const dataDir = dirname(datasetDir) === 'data' ? '' : ` --data_dir=${shellWord(dirname(datasetDir))}`;
  if ([...preparableDatasets, 'openwebtext'].includes(name)) return `${cliCommand} prepare ${name}${dataDir}`;
  const characters = ['meta.json', 'meta.pkl'].some((file) => existsSync(join(datasetDir, file))) ? ' --tokenizer=char' : '';
  return `${cliCommand} prepare text --name=${shellWord(name)}${dataDir}${characters} FILE...`;
}

/** Builds `<dataDir>/<dataset>/` from its raw text, like nanoGPT's `data/<dataset>/prepare.py`. */
export async function prepare(dataset: string, options: PrepareOptions = {}): Promise<PrepareResult> {
  const preparer = preparers[dataset];
  if (!preparer) {
    throw new UserError(`nanogpt-rs cannot prepare dataset '${dataset}' yet; available: ${preparableDatasets.join(', ')}`);
  }
  const dir = join(options.dataDir ?? 'data', dataset);
  mkdirSync(dir, { recursive: true });
  return preparer(dir, options.log ?? (() => {}));
}

/**
 * The tiny Shakespeare text in `shakespeare_char/input.txt`; both Shakespeare datasets read that one copy. Where it
 * is missing it comes from the copy the package ships (so an installed package prepares it offline), else the web.
 */
async function readShakespeare(dataDir: string): Promise<string> {
  const inputPath = join(dataDir, 'shakespeare_char', 'input.txt');
  if (!existsSync(inputPath)) {
    mkdirSync(dirname(inputPath), { recursive: true });
    if (existsSync(packagedShakespeare)) copyFileSync(packagedShakespeare, inputPath);
    else await download(shakespeareUrl, inputPath);
  }
  return readFileSync(inputPath, 'utf8');
}

const packagedShakespeare = fileURLToPath(new URL('../data/shakespeare_char/input.txt', import.meta.url));

/** data/shakespeare_char/prepare.py: the first 90% of the characters train, the rest validate. */
async function prepareShakespeareChar(dir: string, log: (line: string) => void): Promise<PrepareResult> {
  const text = await readShakespeare(dirname(dir));
  const { tokenizer, train, val } = encodeCharDataset(text);
  log(`length of dataset in characters: ${(train.length + val.length).toLocaleString('en-US')}`);
  log(`all the unique characters: ${tokenizer.characters}`);
  log(`vocab size: ${tokenizer.vocabSize.toLocaleString('en-US')}`);
  log(`train has ${train.length.toLocaleString('en-US')} tokens`);
  log(`val has ${val.length.toLocaleString('en-US')} tokens`);
  writeFileAtomic(join(dir, 'train.bin'), toUint16LE(train));
  writeFileAtomic(join(dir, 'val.bin'), toUint16LE(val));
  writeFileAtomic(join(dir, 'meta.json'), JSON.stringify(tokenizer.toMeta()));
  return { train_tokens: train.length, val_tokens: val.length, vocab_size: tokenizer.vocabSize };
}

/**
 * data/shakespeare/prepare.py: the same 90/10 split of the characters, each part then GPT-2 encoded on its own
 * (encode_ordinary, no end-of-text tokens); no meta.json, so training and sampling use GPT-2's vocabulary.
 */
async function prepareShakespeare(dir: string, log: (line: string) => void): Promise<PrepareResult> {
  const text = await readShakespeare(dirname(dir));
  const split = Math.floor(text.length * 0.9);
  const train = Uint16Array.from(gpt2Tokenizer.encodeOrdinary(text.slice(0, split)));
  const val = Uint16Array.from(gpt2Tokenizer.encodeOrdinary(text.slice(split)));
  log(`train has ${train.length.toLocaleString('en-US')} tokens`);
  log(`val has ${val.length.toLocaleString('en-US')} tokens`);
  writeFileAtomic(join(dir, 'train.bin'), toUint16LE(train));
  writeFileAtomic(join(dir, 'val.bin'), toUint16LE(val));
  return { train_tokens: train.length, val_tokens: val.length, vocab_size: gpt2VocabSize };
}

async function download(url: string, path: string): Promise<void> {
  let text: string;
  try {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    text = await response.text();
  } catch (err) {
    throw new UserError(`could not download ${url} (${firstLine(err)}); save that file as ${path} and run again`);
  }
  writeFileAtomic(path, text);
}

function toUint16LE(ids: Uint16Array): Buffer {
  const bytes = Buffer.alloc(ids.length * 2);
  ids.forEach((id, i) => bytes.writeUInt16LE(id, i * 2));
  return bytes;
}

/**
 * nanoGPT's get_batch over `<dataset>/{train,val}.bin`. Windows are read straight from the file at their byte
 * offsets, so datasets larger than memory (OpenWebText's train.bin is 17 GB) cost nothing to open.
 */
export class BatchLoader {
  private readonly files = new Map<Split, { fd: number; tokens: number }>();
  private readonly window: Buffer;

  constructor(
    private readonly datasetDir: string,
    private readonly batchSize: number,
    private readonly blockSize: number,
    private readonly seed: number,
  ) {
    this.window = Buffer.alloc((blockSize + 1) * 2);
    for (const split of ['train', 'val'] as const) this.files.set(split, this.open(split));
  }

  /**
   * Batch number `position` of the training steps' batches (see `batchRng`): a resumed run that asks for the positions
   * it has reached draws the batches of the run it resumes.
   */
  step(position: number): Batch {
    return this.draw('train', 'step', position);
  }

  /** Batch number `position` of the evaluations' batches of `split`. */
  evaluation(split: Split, position: number): Batch {
    return this.draw(split, 'eval', position);
  }

  private draw(split: Split, use: BatchUse, position: number): Batch {
    const { fd, tokens } = this.files.get(split)!;
    const ids = new Uint16Array(this.blockSize + 1);
    return sampleBatch(tokens, this.batchSize, this.blockSize, batchRng(this.seed, split, use, position), (offset) => {
      readTokens(fd, offset, this.window);
      for (let t = 0; t < ids.length; t++) ids[t] = this.window.readUInt16LE(t * 2);
      return ids;
    });
  }

  close(): void {
    for (const { fd } of this.files.values()) closeSync(fd);
    this.files.clear();
  }

  private open(split: Split): { fd: number; tokens: number } {
    const path = join(this.datasetDir, `${split}.bin`);
    if (!existsSync(path)) {
      throw new UserError(`no ${path}: the dataset is not prepared; run \`${prepareCommand(this.datasetDir)}\` first`);
    }
    const fd = openSync(path, 'r');
    const size = fstatSync(fd).size;
    // uint16 ids: an odd size means a torn or foreign file (numpy's memmap refuses it too).
    if (size % 2 !== 0) {
      closeSync(fd);
      throw new UserError(`${path} holds ${size} bytes, not a whole number of uint16 tokens; prepare the dataset again (\`${prepareCommand(this.datasetDir)}\`)`);
    }
    const tokens = size / 2;
    if (tokens <= this.blockSize) {
      closeSync(fd);
      throw new UserError(`${path} has ${tokens} tokens, too few for block_size ${this.blockSize}; lower --block_size`);
    }
    return { fd, tokens };
  }
}

/** Fills `into` with the uint16 tokens starting at token `offset`; offsets are plain numbers, exact up to 2^53. */
export function readTokens(fd: number, offset: number, into: Buffer): void {
  let done = 0;
  while (done < into.length) {
    const read = readSync(fd, into, done, into.length - done, offset * 2 + done);
    if (read === 0) throw new Error(`unexpected end of data file at byte ${offset * 2 + done}`);
    done += read;
  }
}
