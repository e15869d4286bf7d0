// Corpora too big for memory, prepared like nanoGPT's data/openwebtext/prepare.py: every document is GPT-2 encoded
// (encode_ordinary, then <|endoftext|> appended) or character encoded, a fixed-seed fraction of the documents
// (0.0005, as nanoGPT's train_test_split) goes to val, and each split's ids are streamed into a uint16 .bin.
// A corpus with too few documents for that (fewer than one expected in val) is split within its token stream
// instead: the last 10% validates, as in the Shakespeare datasets.
//
// CLI (wired in cli.ts):
//   nanogpt-rs prepare openwebtext [--input=DIR] [--data_dir=data] [--workers=N] [--val_fraction=0.0005] [--seed=2357]
//       DIR (default <data_dir>/openwebtext/source/) holds Hugging Face parquet shards (a `text` column), .jsonl
//       (a `text` field per line) or .txt (one document per file); if it is missing or empty the parquet shards of
//       Skylion007/openwebtext are downloaded into it first (resumable).
//   nanogpt-rs prepare text --name=NAME [--tokenizer=gpt2|char] [--data_dir=data] [...same options] FILES...
//       Any corpus of .txt / .jsonl / .parquet files into <data_dir>/NAME/.
//
// Pipeline: documents are read in order (parquet one row group at a time), grouped into batches of about a MiB,
// tokenised on worker threads, and written back in order as batches return; at most a few batches per worker are
// in flight, so readers never race ahead and memory does not grow with the corpus. Output goes to
// `{train,val}.bin.partial` plus `prepare.journal.json` (what is on disk, fsynced every few seconds); only a
// finished run renames them to `{train,val}.bin`. A killed run resumes from the journal on the next start.
import {
  closeSync,
  createReadStream,
  existsSync,
  fsyncSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism, endianness } from 'node:os';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { defaultSplitSeed, defaultValFraction } from './config.ts';
import { CharTokenizer } from './data.ts';
import { firstLine, UserError } from './errors.ts';
import { writeFileAtomic } from './files.ts';
import type { TokenizeReply, TokenizeTask, WorkerInit } from './tokenize-worker.ts';
import { gpt2VocabSize } from './tokenizer.ts';

export type CorpusTokenizer = 'gpt2' | 'char';

export interface CorpusOptions {
  /** The dataset's folder name under dataDir (`openwebtext`, or `--name` of `prepare text`). */
  name: string;
  /** Input files, in this order (`prepare text FILES...`). */
  files?: string[];
  /** Otherwise every .parquet/.jsonl/.txt file in this folder, sorted by name (`prepare openwebtext --input`). */
  inputDir?: string;
  /** When inputDir is missing or empty, download OpenWebText's parquet shards into it first. */
  downloadOpenWebText?: boolean;
  tokenizer?: CorpusTokenizer;
  /** Folder holding the datasets; `data` by default. */
  dataDir?: string;
  /** Fraction of documents that go to val; nanoGPT's 0.0005 by default. */
  valFraction?: number;
  /** Seed of the train/val split; nanoGPT's 2357 by default. */
  seed?: number;
  /** Tokenising threads; all cores by default. */
  workers?: number;
  /** Text per worker task, in UTF-16 code units (about bytes for ASCII); 1 Mi by default. */
  batchChars?: number;
  /** How often the partial output is fsynced and the journal written; 2000 ms by default. */
  journalEveryMs?: number;
  /** Receives what prepare.py prints (vocabulary, resumed runs); nothing is printed by default. */
  log?: (line: string) => void;
  /** Where the progress line/lines go; nowhere by default (the CLI passes process.stdout). */
  progressStream?: Pick<NodeJS.WriteStream, 'write' | 'isTTY'>;
  /** Called after each journal write (tests use it to kill a run at a known point). */
  onCheckpoint?: (state: Readonly<JournalState>) => void;
}

export interface CorpusResult {
  trainTokens: number;
  valTokens: number;
  trainDocuments: number;
  valDocuments: number;
  vocabSize: number;
  /** Whether an interrupted run was continued. */
  resumed: boolean;
}

export interface JournalState {
  fingerprint: string;
  /** Documents whose tokens are all in the partial files (the first `documents` of the corpus, in order). */
  documents: number;
  trainTokens: number;
  valTokens: number;
  trainDocuments: number;
  valDocuments: number;
  textBytes: number;
}

/** The share of the token stream that validates when whole documents cannot (the Shakespeare datasets' split). */
export const streamValFraction = 0.1;
const journalName = 'prepare.journal.json';
const openWebTextParquetList = 'https://huggingface.co/api/datasets/Skylion007/openwebtext/parquet/plain_text/train';
const inputExtensions = new Set(['.parquet', '.jsonl', '.txt']);

/** `prepare openwebtext`: OpenWebText from local files, downloading the Hugging Face parquet shards if there are none. */
export function prepareOpenWebText(options: Omit<CorpusOptions, 'name' | 'tokenizer' | 'files'> = {}): Promise<CorpusResult> {
  const dataDir = options.dataDir ?? 'data';
  return prepareCorpus({
    downloadOpenWebText: true,
    ...options,
    name: 'openwebtext',
    tokenizer: 'gpt2',
    inputDir: options.inputDir ?? join(dataDir, 'openwebtext', 'source'),
  });
}

/**
 * Whether document `index` goes to val: a hash of (seed, index) mapped to [0, 1) below valFraction. It depends on
 * nothing else (not on batches or worker timing), so the split is reproducible; it is not nanoGPT's exact
 * permutation (that needs the whole dataset shuffled), only the same fraction.
 */
export function isValDocument(index: number, seed: number, valFraction: number): boolean {
  let h = Math.imul(seed ^ 0x5bd1e995, 0x9e3779b1) ^ (index >>> 0);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) ^ Math.floor(index / 2 ** 32);
  h = Math.imul(h ^ (h >>> 16), 0x27d4eb2d);
  h ^= h >>> 15;
  return (h >>> 0) / 2 ** 32 < valFraction;
}

export async function prepareCorpus(options: CorpusOptions): Promise<CorpusResult> {
  const log = options.log ?? (() => {});
  const tokenizer = options.tokenizer ?? 'gpt2';
  const valFraction = options.valFraction ?? defaultValFraction;
  const seed = options.seed ?? defaultSplitSeed;
  const workerCount = Math.max(1, Math.floor(options.workers ?? availableParallelism()));
  const batchChars = options.batchChars ?? 1 << 20;
  const journalEveryMs = options.journalEveryMs ?? 2000;
  if (!/^[\w.-]+$/.test(options.name)) throw new UserError(`dataset name '${options.name}' must be letters, digits, '_', '-' or '.'`);
  if (tokenizer !== 'gpt2' && tokenizer !== 'char') throw new UserError(`unknown tokenizer '${String(tokenizer)}'; use gpt2 or char`);
  if (!(valFraction >= 0 && valFraction < 1)) throw new UserError(`--val_fraction=${valFraction} must be in [0, 1)`);
  if (!Number.isInteger(seed)) throw new UserError(`--seed=${seed} must be an integer`);

  const files = await inputFiles(options, log);
  const dir = join(options.dataDir ?? 'data', options.name);
  mkdirSync(dir, { recursive: true });

  let chars: string | undefined;
  let vocabSize = gpt2VocabSize;
  if (tokenizer === 'char') {
    chars = await characterVocabulary(files);
    vocabSize = [...chars].length;
    if (vocabSize > 65536) throw new UserError(`the corpus has ${vocabSize} distinct characters, more than uint16 ids can hold; use --tokenizer=gpt2`);
    log(`all the unique characters: ${chars}`);
    log(`vocab size: ${vocabSize.toLocaleString('en-US')}`);
  }
  // Too few documents to expect even one in val: split the token stream instead.
  const splitsStream = (await countDocuments(files, valFraction > 0 ? Math.ceil(1 / valFraction) : 1)) * valFraction < 1;
  const fingerprint = JSON.stringify({
    version: 1,
    tokenizer,
    seed,
    valFraction,
    files: files.map((file) => {
      const stat = statSync(file);
      return [resolve(file), stat.size, stat.mtimeMs];
    }),
  });

  // Resume, or start over.
  const paths = { train: join(dir, 'train.bin.partial'), val: join(dir, 'val.bin.partial'), journal: join(dir, journalName) };
  let state: JournalState = { fingerprint, documents: 0, trainTokens: 0, valTokens: 0, trainDocuments: 0, valDocuments: 0, textBytes: 0 };
  let resumed = false;
  if (existsSync(paths.train) || existsSync(paths.val) || existsSync(paths.journal)) {
    const previous = readJournal(paths.journal);
    const usable =
      previous?.fingerprint === fingerprint &&
      existsSync(paths.train) &&
      existsSync(paths.val) &&
      statSync(paths.train).size >= previous.trainTokens * 2 &&
      statSync(paths.val).size >= previous.valTokens * 2;
    if (usable) {
      state = previous;
      resumed = true;
      log(`resuming an interrupted run of ${dir}: ${state.documents.toLocaleString('en-US')} documents were already done`);
    } else {
      log(`found partial output of an interrupted run in ${dir} that cannot be resumed (${previous ? 'the inputs or options changed' : 'no usable journal'}); starting over`);
      rmSync(paths.journal, { force: true });
    }
  }
  const fds = { train: openSync(paths.train, resumed ? 'r+' : 'w+'), val: openSync(paths.val, resumed ? 'r+' : 'w') };
  ftruncateSync(fds.train, state.trainTokens * 2);
  ftruncateSync(fds.val, state.valTokens * 2);
  const checkpoint = (): void => {
    fsyncSync(fds.train);
    fsyncSync(fds.val);
    writeFileAtomic(paths.journal, JSON.stringify(state));
    options.onCheckpoint?.(state);
  };
  if (!resumed) checkpoint();

  const progress = new CorpusProgress(options.progressStream ?? { write: () => true, isTTY: false }, state);
  const pool = new WorkerPool(workerCount, { tokenizer, chars });
  try {
    // Batches leave in document order and their results are written in that order; `inFlight` counts batches
    // sent but not yet written (busy or waiting for an earlier one), so it bounds memory.
    const maxInFlight = workerCount * 2 + 1;
    const finished = new Map<number, { first: number; reply: TokenizeReply }>();
    let nextBatch = 0;
    let nextToWrite = 0;
    let inFlight = 0;
    let failure: unknown;
    let wake: (() => void) | undefined;
    let lastCheckpoint = performance.now();
    const littleEndian = endianness() === 'LE';

    const writeBatch = (first: number, reply: TokenizeReply): void => {
      let at = 0;
      let runSplit: 'train' | 'val' | undefined;
      let runStart = 0;
      const flush = (end: number): void => {
        if (runSplit === undefined || end === runStart) return;
        const ids = reply.tokens.subarray(runStart, end);
        if (!littleEndian) for (let i = 0; i < ids.length; i++) ids[i] = ((ids[i] & 0xff) << 8) | (ids[i] >>> 8);
        const bytes = Buffer.from(ids.buffer, ids.byteOffset, ids.byteLength);
        const fd = fds[runSplit];
        const position = (runSplit === 'train' ? state.trainTokens : state.valTokens) * 2;
        for (let done = 0; done < bytes.length; ) done += writeSync(fd, bytes, done, bytes.length - done, position + done);
        if (runSplit === 'train') state.trainTokens += ids.length;
        else state.valTokens += ids.length;
      };
      reply.lengths.forEach((length, i) => {
        const split = !splitsStream && isValDocument(first + i, seed, valFraction) ? 'val' : 'train';
        if (split !== runSplit) {
          flush(at);
          runSplit = split;
          runStart = at;
        }
        if (split === 'val') state.valDocuments++;
        else state.trainDocuments++;
        at += length;
      });
      flush(at);
      state.documents = first + reply.lengths.length;
      state.textBytes += reply.textBytes;
    };

    const drain = (): void => {
      try {
        let wrote = false;
        for (let done = finished.get(nextToWrite); done; done = finished.get(nextToWrite)) {
          finished.delete(nextToWrite++);
          writeBatch(done.first, done.reply);
          inFlight--;
          wrote = true;
        }
        progress.update(state);
        // A batch that finished ahead of an earlier one is held back, and changes nothing on disk yet.
        if (wrote && performance.now() - lastCheckpoint >= journalEveryMs) {
          checkpoint();
          lastCheckpoint = performance.now();
        }
      } catch (err) {
        failure ??= err;
      }
      wake?.();
    };

    const send = async (first: number, docs: string[]): Promise<void> => {
      while (inFlight >= maxInFlight && failure === undefined) await new Promise<void>((resolve) => (wake = resolve));
      if (failure !== undefined) throw failure;
      const batch = nextBatch++;
      inFlight++;
      pool.run(docs).then(
        (reply) => {
          finished.set(batch, { first, reply });
          drain();
        },
        (err: unknown) => {
          failure ??= err;
          wake?.();
        },
      );
    };

    let docs: string[] = [];
    let docsChars = 0;
    let index = state.documents;
    let first = index;
    for await (const text of documents(files, state.documents)) {
      docs.push(text);
      docsChars += text.length;
      index++;
      if (docsChars >= batchChars) {
        await send(first, docs);
        docs = [];
        docsChars = 0;
        first = index;
      }
    }
    if (docs.length) await send(first, docs);
    while (inFlight > 0 && failure === undefined) await new Promise<void>((resolve) => (wake = resolve));
    if (failure !== undefined) throw failure;

    // All documents are in train.bin, in order, when none went to val: its tail becomes val.
    if (state.valTokens === 0) {
      const moved = moveStreamTail(fds.train, fds.val, state.trainTokens);
      state.trainTokens -= moved;
      state.valTokens = moved;
      log(`${state.documents.toLocaleString('en-US')} documents are too few for a val split of whole documents at --val_fraction=${valFraction}; val.bin is the last ${streamValFraction * 100}% of the token stream instead`);
    }
    checkpoint();
  } finally {
    progress.finish(state);
    await pool.close();
    closeSync(fds.train);
    closeSync(fds.val);
  }

  // Done: the real names appear only now (meta.json first, so a char dataset never has bins without it).
  if (tokenizer === 'char') writeFileAtomic(join(dir, 'meta.json'), JSON.stringify(CharTokenizer.fromText(chars!).toMeta()));
  else rmSync(join(dir, 'meta.json'), { force: true });
  renameSync(paths.val, join(dir, 'val.bin'));
  renameSync(paths.train, join(dir, 'train.bin'));
  rmSync(paths.journal, { force: true });
  fsyncDir(dir);
  log(`train has ${state.trainTokens.toLocaleString('en-US')} tokens (${state.trainDocuments.toLocaleString('en-US')} documents)`);
  log(`val has ${state.valTokens.toLocaleString('en-US')} tokens (${state.valDocuments.toLocaleString('en-US')} documents)`);
  if (state.valTokens === 0) log(`warning: val.bin is empty (${state.documents} documents, --val_fraction=${valFraction}); training needs a val split: raise --val_fraction or add documents`);
  return {
    trainTokens: state.trainTokens,
    valTokens: state.valTokens,
    trainDocuments: state.trainDocuments,
    valDocuments: state.valDocuments,
    vocabSize,
    resumed,
  };
}

/**
 * Moves the last `streamValFraction` of the `tokens` uint16 ids in `trainFd` to the start of the empty `valFd`
 * (val written and synced before train is cut), and returns how many ids moved.
 */
function moveStreamTail(trainFd: number, valFd: number, tokens: number): number {
  const keep = Math.floor(tokens * (1 - streamValFraction));
  const chunk = Buffer.alloc(1 << 24);
  for (let from = keep * 2, to = 0; from < tokens * 2; ) {
    const read = readSync(trainFd, chunk, 0, Math.min(chunk.length, tokens * 2 - from), from);
    for (let done = 0; done < read; ) done += writeSync(valFd, chunk, done, read - done, to + done);
    from += read;
    to += read;
  }
  fsyncSync(valFd);
  ftruncateSync(trainFd, keep * 2);
  return tokens - keep;
}

function readJournal(path: string): JournalState | undefined {
  try {
    const state = JSON.parse(readFileSync(path, 'utf8')) as JournalState;
    return typeof state.fingerprint === 'string' && Number.isInteger(state.documents) ? state : undefined;
  } catch {
    return undefined;
  }
}

function fsyncDir(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Inputs

async function inputFiles(options: CorpusOptions, log: (line: string) => void): Promise<string[]> {
  if (options.files?.length) {
    for (const file of options.files) {
      if (!existsSync(file) || !statSync(file).isFile()) throw new UserError(`no such file: ${file}`);
      if (!inputExtensions.has(extname(file).toLowerCase())) throw new UserError(`${file}: unsupported file type; use .txt (one document per file), .jsonl (a "text" field per line) or .parquet (a "text" column)`);
    }
    return options.files;
  }
  const dir = options.inputDir;
  if (!dir) throw new UserError('no input: give the corpus files (.txt, .jsonl or .parquet)');
  let found = listInputs(dir);
  if (!found.length && options.downloadOpenWebText) {
    await downloadOpenWebText(dir, log);
    found = listInputs(dir);
  }
  if (!found.length) throw new UserError(`no .parquet, .jsonl or .txt files in ${dir}; put the corpus there and run again`);
  return found;
}

function listInputs(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((name) => inputExtensions.has(extname(name).toLowerCase()))
    .sort()
    .map((name) => join(dir, name));
}

/** The corpus's documents in order, after skipping the first `skip` (already done by an interrupted run). */
async function* documents(files: string[], skip: number): AsyncGenerator<string> {
  for (const file of files) {
    const ext = extname(file).toLowerCase();
    if (ext === '.txt') {
      if (skip > 0) skip--;
      else yield readFileSync(file, 'utf8');
    } else if (ext === '.jsonl') {
      let lineNumber = 0;
      const lines = createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
      for await (const line of lines) {
        lineNumber++;
        if (!line.trim()) continue;
        if (skip > 0) {
          skip--;
          continue;
        }
        let text: unknown;
        try {
          text = (JSON.parse(line) as { text?: unknown }).text;
        } catch (err) {
          throw new UserError(`${file}:${lineNumber}: not JSON (${firstLine(err)})`);
        }
        if (typeof text !== 'string') throw new UserError(`${file}:${lineNumber}: no "text" string field`);
        yield text;
      }
    } else {
      const { buffer, metadata } = await openParquet(file);
      const { parquetReadObjects, parquetSchema } = await import('hyparquet');
      const columns = parquetSchema(metadata).children.map((child) => child.element.name);
      if (!columns.includes('text')) throw new UserError(`${file}: no "text" column (columns: ${columns.join(', ')})`);
      let rowStart = 0;
      for (const group of metadata.row_groups) {
        const rows = Number(group.num_rows);
        const rowEnd = rowStart + rows;
        if (skip >= rows) {
          skip -= rows;
        } else {
          // One row group at a time: only its text column is read and decoded.
          const from = rowStart + skip;
          skip = 0;
          const records = await parquetReadObjects({ file: buffer, metadata, columns: ['text'], rowStart: from, rowEnd });
          for (const record of records) yield typeof record.text === 'string' ? record.text : '';
        }
        rowStart = rowEnd;
      }
    }
  }
}

async function openParquet(file: string) {
  const { asyncBufferFromFile, parquetMetadataAsync } = await import('hyparquet');
  const buffer = await asyncBufferFromFile(file);
  try {
    return { buffer, metadata: await parquetMetadataAsync(buffer) };
  } catch (err) {
    throw new UserError(`${file}: not a readable parquet file (${firstLine(err)})`);
  }
}

/** The corpus's document count, or `limit` if it has at least that many (so a big corpus is not read twice). */
async function countDocuments(files: string[], limit: number): Promise<number> {
  let count = 0;
  for (const file of files) {
    if (count >= limit) break;
    const ext = extname(file).toLowerCase();
    if (ext === '.txt') {
      count++;
    } else if (ext === '.jsonl') {
      const lines = createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
      for await (const line of lines) {
        if (line.trim()) count++;
        if (count >= limit) break;
      }
      lines.close();
    } else {
      count += Number((await openParquet(file)).metadata.num_rows);
    }
  }
  return Math.min(count, limit);
}

/** nanoGPT's char vocabulary: the sorted set of characters (code points) of the whole corpus, in a first pass. */
async function characterVocabulary(files: string[]): Promise<string> {
  const seen = new Uint8Array(65536);
  const astral = new Set<number>();
  for await (const text of documents(files, 0)) {
    for (let i = 0; i < text.length; i++) {
      const unit = text.charCodeAt(i);
      if (unit >= 0xd800 && unit < 0xdc00 && i + 1 < text.length) {
        const low = text.charCodeAt(i + 1);
        if (low >= 0xdc00 && low < 0xe000) {
          astral.add(text.codePointAt(i)!);
          i++;
          continue;
        }
      }
      seen[unit] = 1;
    }
  }
  let chars = '';
  for (let unit = 0; unit < 65536; unit++) if (seen[unit]) chars += String.fromCharCode(unit);
  for (const point of [...astral].sort((a, b) => a - b)) chars += String.fromCodePoint(point);
  return chars;
}

// ---------------------------------------------------------------------------------------------------------------
// OpenWebText download

async function downloadOpenWebText(dir: string, log: (line: string) => void): Promise<void> {
  const offline = (err: unknown): UserError =>
    new UserError(
      `no OpenWebText files in ${dir} and could not download them (${firstLine(err)}); put the parquet shards of the Hugging Face dataset Skylion007/openwebtext (or .jsonl/.txt files) in ${dir} and run again`,
    );
  let urls: string[];
  try {
    const response = await fetch(openWebTextParquetList);
    if (!response.ok) throw new Error(`HTTP ${response.status} from ${openWebTextParquetList}`);
    urls = (await response.json()) as string[];
    if (!Array.isArray(urls) || !urls.length || urls.some((url) => typeof url !== 'string')) throw new Error(`unexpected answer from ${openWebTextParquetList}`);
  } catch (err) {
    throw offline(err);
  }
  mkdirSync(dir, { recursive: true });
  log(`downloading OpenWebText: ${urls.length} parquet shards into ${dir}`);
  for (const [i, url] of urls.entries()) {
    // Shard names are 0000.parquet, ...; the index keeps them unique and in order.
    const path = join(dir, `train-${String(i).padStart(5, '0')}-${basename(new URL(url).pathname)}`);
    if (existsSync(path)) continue;
    log(`shard ${i + 1}/${urls.length}: ${url}`);
    try {
      await downloadResumable(url, path);
    } catch (err) {
      throw offline(err);
    }
  }
}

/** Downloads into `<path>.part`, continuing a previous attempt with an HTTP Range request; renames when complete. */
async function downloadResumable(url: string, path: string): Promise<void> {
  const part = `${path}.part`;
  let have = existsSync(part) ? statSync(part).size : 0;
  const response = await fetch(url, { headers: have ? { Range: `bytes=${have}-` } : {} });
  if (response.status === 416 && have > 0) {
    renameSync(part, path); // the previous attempt had everything
    return;
  }
  if (response.status === 200) have = 0;
  else if (response.status !== 206) throw new Error(`HTTP ${response.status} from ${url}`);
  const fd = openSync(part, have ? 'r+' : 'w');
  try {
    ftruncateSync(fd, have);
    let position = have;
    for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
      for (let done = 0; done < chunk.length; ) done += writeSync(fd, chunk, done, chunk.length - done, position + done);
      position += chunk.length;
    }
    const expected = Number(response.headers.get('content-length') ?? NaN);
    if (Number.isFinite(expected) && position - have !== expected) throw new Error(`connection closed early (${position - have} of ${expected} bytes)`);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(part, path);
  fsyncDir(dirname(path));
}

// ---------------------------------------------------------------------------------------------------------------
// Workers

// The worker is this module's sibling: compiled JavaScript in the package (dist/), TypeScript when the sources run
// under tsx (the tests), where the thread has to register tsx itself since loaders are not inherited by threads.
const ownExtension = extname(fileURLToPath(import.meta.url));
const workerEntry = new URL(`./tokenize-worker${ownExtension}`, import.meta.url);

function startWorker(init: WorkerInit): Worker {
  if (ownExtension !== '.ts') return new Worker(workerEntry, { workerData: init });
  const tsxApi = pathToFileURL(
    createRequire(import.meta.url).resolve('tsx/package.json').replace(/package\.json$/, 'dist/esm/api/index.mjs'),
  ).href;
  const bootstrap = `import(${JSON.stringify(tsxApi)}).then((tsx) => { tsx.register(); return import(${JSON.stringify(workerEntry.href)}); });`;
  return new Worker(bootstrap, { eval: true, workerData: init });
}

/** Tokenising threads, each busy with one batch at a time; extra batches queue. */
export class WorkerPool {
  private readonly idle: Worker[] = [];
  private readonly all: Worker[] = [];
  private readonly queue: { task: TokenizeTask; resolve: (reply: TokenizeReply) => void; reject: (err: unknown) => void }[] = [];
  private readonly pending = new Map<Worker, (typeof this.queue)[number]>();
  private nextId = 0;

  constructor(size: number, init: WorkerInit) {
    for (let i = 0; i < size; i++) {
      const worker = startWorker(init);
      worker.on('message', (reply: TokenizeReply) => {
        const job = this.pending.get(worker)!;
        this.pending.delete(worker);
        if (reply.error !== undefined) job.reject(new Error(`tokenizer thread: ${reply.error}`));
        else job.resolve(reply);
        this.idle.push(worker);
        this.pump();
      });
      worker.on('error', (err) => this.fail(worker, err));
      worker.on('exit', (code) => this.fail(worker, new Error(`tokenizer thread exited with code ${code}`)));
      this.all.push(worker);
      this.idle.push(worker);
    }
  }

  run(docs: string[]): Promise<TokenizeReply> {
    return new Promise((resolve, reject) => {
      this.queue.push({ task: { id: this.nextId++, docs }, resolve, reject });
      this.pump();
    });
  }

  async close(): Promise<void> {
    const all = this.all.splice(0);
    await Promise.all(all.map((worker) => worker.terminate()));
  }

  private pump(): void {
    while (this.idle.length && this.queue.length) {
      const worker = this.idle.pop()!;
      const job = this.queue.shift()!;
      this.pending.set(worker, job);
      worker.postMessage(job.task);
    }
  }

  private fail(worker: Worker, err: unknown): void {
    if (!this.all.includes(worker)) return; // terminated by close()
    const job = this.pending.get(worker);
    this.pending.delete(worker);
    job?.reject(err);
    for (const queued of this.queue.splice(0)) queued.reject(err);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Progress

class CorpusProgress {
  private readonly interactive: boolean;
  private readonly startedAt = performance.now();
  private readonly startBytes: number;
  private lastAt = 0;
  private drawn = false;

  constructor(
    private readonly stream: Pick<NodeJS.WriteStream, 'write' | 'isTTY'>,
    start: JournalState,
  ) {
    this.interactive = Boolean(stream.isTTY);
    this.startBytes = start.textBytes;
  }

  update(state: JournalState): void {
    const now = performance.now();
    if (now - this.lastAt < (this.interactive ? 200 : 5000)) return;
    this.lastAt = now;
    const line = this.line(state, now);
    if (this.interactive) {
      this.stream.write(`\r\x1b[2K${line}`);
      this.drawn = true;
    } else {
      this.stream.write(`${line}\n`);
    }
  }

  finish(state: JournalState): void {
    if (this.interactive && this.drawn) this.stream.write(`\r\x1b[2K${this.line(state, performance.now())}\n`);
    this.drawn = false;
  }

  private line(state: JournalState, now: number): string {
    const mb = state.textBytes / 1e6;
    const rate = (state.textBytes - this.startBytes) / 1e6 / Math.max((now - this.startedAt) / 1000, 1e-3);
    const tokens = state.trainTokens + state.valTokens;
    return `documents ${state.documents.toLocaleString('en-US')}, ${mb.toFixed(1)} MB read, ${rate.toFixed(2)} MB/s, ${tokens.toLocaleString('en-US')} tokens`;
  }
}
