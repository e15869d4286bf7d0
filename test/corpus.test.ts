import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parquetWriteFile } from 'hyparquet-writer';
import { afterAll, describe, expect, it } from 'vitest';
import { isValDocument, prepareCorpus, type CorpusOptions, type CorpusResult } from '../ts/corpus.ts';
import { CharTokenizer, readMeta } from '../ts/data.ts';
import { endOfText, gpt2Tokenizer } from '../ts/tokenizer.ts';

const root = mkdtempSync(join(tmpdir(), 'nanogpt-corpus-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let counter = 0;
const freshDir = (): string => join(root, `run-${counter++}`);
const quiet = { log: () => {}, progressStream: { write: () => true, isTTY: false } };

/** Deterministic pseudo-random documents with multi-byte text, empty documents and a literal `<|endoftext|>`. */
function makeDocs(count: number, seed = 1): string[] {
  const words = ['the', 'of', 'and', 'données', 'naïve', '🙂', 'GPT', 'model', '<|endoftext|>', '\n\n', '  spaced', '1234', 'tokens'];
  let s = seed;
  const rand = (n: number): number => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s % n;
  };
  return Array.from({ length: count }, (_, i) => (i % 17 === 5 ? '' : Array.from({ length: rand(80) }, () => words[rand(words.length)]).join(' ')));
}

function readBin(path: string): Uint16Array {
  const bytes = readFileSync(path);
  return new Uint16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

/** What train.bin/val.bin must hold: each document encoded directly, + EOT, in order, by the split rule. */
function expectedSplits(docs: string[], seed: number, valFraction: number): { train: number[]; val: number[]; valDocs: number } {
  const train: number[] = [];
  const val: number[] = [];
  let valDocs = 0;
  docs.forEach((doc, i) => {
    const ids = [...gpt2Tokenizer.encodeOrdinary(doc), endOfText];
    if (isValDocument(i, seed, valFraction)) {
      val.push(...ids);
      valDocs++;
    } else train.push(...ids);
  });
  return { train, val, valDocs };
}

function writeJsonl(path: string, docs: string[]): void {
  writeFileSync(path, docs.map((text) => JSON.stringify({ text, id: 1 })).join('\n') + '\n');
}

describe('prepareCorpus (gpt2)', () => {
  const docs = makeDocs(240);
  const seed = 7;
  const valFraction = 0.2;
  const expected = expectedSplits(docs, seed, valFraction);

  const check = (dataDir: string, result: CorpusResult): void => {
    const train = readBin(join(dataDir, 'c', 'train.bin'));
    const val = readBin(join(dataDir, 'c', 'val.bin'));
    expect(result.trainTokens).toBe(expected.train.length);
    expect(result.valTokens).toBe(expected.val.length);
    expect(result.valDocuments).toBe(expected.valDocs);
    expect(result.trainDocuments + result.valDocuments).toBe(docs.length);
    expect(Array.from(train)).toEqual(expected.train);
    expect(Array.from(val)).toEqual(expected.val);
    expect(existsSync(join(dataDir, 'c', 'meta.json'))).toBe(false);
    expect(readdirSync(join(dataDir, 'c')).sort()).toEqual(['train.bin', 'val.bin']);
  };

  it('jsonl: exact tokens, EOT after every document, both splits non-empty', async () => {
    expect(expected.valDocs).toBeGreaterThan(20);
    expect(expected.valDocs).toBeLessThan(80);
    const file = join(root, 'docs.jsonl');
    writeJsonl(file, docs);
    const dataDir = freshDir();
    // Small batches so that many batches are in flight on both workers and come back out of order.
    const result = await prepareCorpus({ name: 'c', files: [file], dataDir, seed, valFraction, workers: 2, batchChars: 500, ...quiet });
    check(dataDir, result);
    // EOT placement, independently of the expected arrays: cutting train.bin at EOTs gives back the documents.
    const train = Array.from(readBin(join(dataDir, 'c', 'train.bin')));
    expect(train.at(-1)).toBe(endOfText);
    const decoded: string[] = [];
    for (let start = 0, i = 0; i < train.length; i++) {
      if (train[i] === endOfText) {
        decoded.push(gpt2Tokenizer.decode(train.slice(start, i)));
        start = i + 1;
      }
    }
    expect(decoded).toEqual(docs.filter((_, i) => !isValDocument(i, seed, valFraction)));
  });

  it('txt (one document per file, in the order given)', async () => {
    const files = docs.map((doc, i) => {
      const path = join(root, `doc-${i}.txt`);
      writeFileSync(path, doc);
      return path;
    });
    const dataDir = freshDir();
    check(dataDir, await prepareCorpus({ name: 'c', files, dataDir, seed, valFraction, workers: 2, batchChars: 2000, ...quiet }));
  });

  it('parquet with several row groups, and a mixed list of files continues the document count', async () => {
    const file = join(root, 'docs.parquet');
    await parquetWriteFile({ filename: file, columnData: [{ name: 'text', data: docs.slice(0, 150), type: 'STRING' }], rowGroupSize: 40 });
    const rest = join(root, 'rest.jsonl');
    writeJsonl(rest, docs.slice(150));
    const dataDir = freshDir();
    check(dataDir, await prepareCorpus({ name: 'c', files: [file, rest], dataDir, seed, valFraction, workers: 2, batchChars: 3000, ...quiet }));
  });

  it('inputDir: every supported file in the folder, sorted by name', async () => {
    const input = join(root, 'owt-source');
    rmSync(input, { recursive: true, force: true });
    const { mkdirSync } = await import('node:fs');
    mkdirSync(input);
    writeJsonl(join(input, 'b.jsonl'), docs.slice(100));
    writeJsonl(join(input, 'a.jsonl'), docs.slice(0, 100));
    writeFileSync(join(input, 'README.md'), 'not a corpus file');
    const dataDir = freshDir();
    check(dataDir, await prepareCorpus({ name: 'c', inputDir: input, dataDir, seed, valFraction, workers: 1, ...quiet }));
  });

  it('the split is deterministic: same seed, same split; another seed, another split', async () => {
    const file = join(root, 'split.jsonl');
    writeJsonl(file, docs);
    const run = async (runSeed: number, workers: number, batchChars: number): Promise<Buffer> => {
      const dataDir = freshDir();
      await prepareCorpus({ name: 'c', files: [file], dataDir, seed: runSeed, valFraction, workers, batchChars, ...quiet });
      return readFileSync(join(dataDir, 'c', 'val.bin'));
    };
    const a = await run(1, 2, 300);
    const b = await run(1, 1, 100_000); // other worker count and batching: same bytes
    const c = await run(2, 2, 300);
    expect(b.equals(a)).toBe(true);
    expect(c.equals(a)).toBe(false);
    // val.bin holds exactly the documents the seed picks, and another seed picks others.
    expect(Array.from(new Uint16Array(a.buffer, a.byteOffset, a.byteLength / 2))).toEqual(expectedSplits(docs, 1, valFraction).val);
    const valIndices = (s: number): number[] => docs.map((_, i) => i).filter((i) => isValDocument(i, s, valFraction));
    expect(valIndices(1).length).toBeGreaterThan(0);
    expect(valIndices(1)).not.toEqual(valIndices(2));
    // The fraction holds at scale.
    let val = 0;
    for (let i = 0; i < 1_000_000; i++) if (isValDocument(i, 2357, 0.0005)) val++;
    expect(val).toBeGreaterThan(400);
    expect(val).toBeLessThan(600);
  });

  it('reports unusable input as a one-line UserError', async () => {
    const bad = join(root, 'bad.jsonl');
    writeFileSync(bad, '{"text": "ok"}\n{"body": "no text"}\n');
    await expect(prepareCorpus({ name: 'c', files: [bad], dataDir: freshDir(), workers: 1, ...quiet })).rejects.toThrow(/bad\.jsonl:2: no "text"/);
    await expect(prepareCorpus({ name: 'c', inputDir: join(root, 'nowhere'), dataDir: freshDir(), ...quiet })).rejects.toThrow(/no \.parquet, \.jsonl or \.txt files/);
  });
});

describe('prepareCorpus with few documents', () => {
  it('splits within the token stream: the last 10% validates, and says so', async () => {
    const files = makeDocs(2, 9).map((doc, i) => {
      const file = join(root, `few-${i}.txt`);
      writeFileSync(file, doc.repeat(20));
      return file;
    });
    const stream = files.flatMap((file) => [...gpt2Tokenizer.encodeOrdinary(readFileSync(file, 'utf8')), endOfText]);
    const dataDir = freshDir();
    const lines: string[] = [];
    const result = await prepareCorpus({ name: 'c', files, dataDir, workers: 1, ...quiet, log: (line) => lines.push(line) });
    const cut = Math.floor(stream.length * 0.9);
    expect(Array.from(readBin(join(dataDir, 'c', 'train.bin')))).toEqual(stream.slice(0, cut));
    expect(Array.from(readBin(join(dataDir, 'c', 'val.bin')))).toEqual(stream.slice(cut));
    expect(result.valTokens).toBe(stream.length - cut);
    expect(lines.join('\n')).toContain('2 documents are too few for a val split of whole documents at --val_fraction=0.0005; val.bin is the last 10% of the token stream');
  });

  it('keeps whole documents when there are enough for the fraction', async () => {
    const docs = makeDocs(40, 3);
    const file = join(root, 'enough.jsonl');
    writeJsonl(file, docs);
    const dataDir = freshDir();
    const result = await prepareCorpus({ name: 'c', files: [file], dataDir, seed: 4, valFraction: 0.1, workers: 1, ...quiet });
    const expected = expectedSplits(docs, 4, 0.1);
    expect(expected.valDocs).toBeGreaterThan(0);
    expect(result.valDocuments).toBe(expected.valDocs);
    expect(Array.from(readBin(join(dataDir, 'c', 'val.bin')))).toEqual(expected.val);
  });
});

describe('prepareCorpus (char)', () => {
  it('builds the vocabulary over all documents and writes meta.json like prepare shakespeare_char', async () => {
    const docs = ['hello world\n', 'naïve 🙂 café', '', 'zebra\tQ'];
    const file = join(root, 'chars.jsonl');
    writeJsonl(file, docs);
    const dataDir = freshDir();
    const result = await prepareCorpus({ name: 'c', files: [file], tokenizer: 'char', dataDir, seed: 3, valFraction: 0.5, workers: 2, batchChars: 4, ...quiet });
    const joined = docs.join('');
    const reference = CharTokenizer.fromText(joined);
    const meta = readMeta(join(dataDir, 'c'))!;
    expect(meta).toEqual(reference.toMeta());
    expect(meta).toEqual(JSON.parse(JSON.stringify(reference.toMeta())));
    expect(result.vocabSize).toBe(reference.vocabSize);
    // No EOT for char: the splits are the documents' characters, concatenated.
    const trainText = docs.filter((_, i) => !isValDocument(i, 3, 0.5)).join('');
    const valText = docs.filter((_, i) => isValDocument(i, 3, 0.5)).join('');
    expect(Array.from(readBin(join(dataDir, 'c', 'train.bin')))).toEqual(Array.from(reference.encode(trainText)));
    expect(Array.from(readBin(join(dataDir, 'c', 'val.bin')))).toEqual(Array.from(reference.encode(valText)));
    expect(result.trainTokens + result.valTokens).toBe([...joined].length);
  });
});

interface ChildOutput extends CorpusResult {
  peakRss: number;
}

/** Runs test/corpus-child.ts; resolves with its JSON line, or with the signal that killed it. */
function runChild(
  options: Partial<CorpusOptions> & { killAfterCheckpoints?: number },
  nodeFlags: string[] = [],
): Promise<{ output?: ChildOutput; signal: NodeJS.Signals | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...nodeFlags, '--import', 'tsx', join(import.meta.dirname, 'corpus-child.ts'), JSON.stringify(options)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => (stdout += chunk));
    child.stderr.on('data', (chunk) => (stderr += chunk));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (signal) return resolve({ signal, stderr });
      if (code !== 0) return reject(new Error(`child exited with ${code}: ${stderr}`));
      resolve({ output: JSON.parse(stdout.trim().split('\n').at(-1)!) as ChildOutput, signal, stderr });
    });
  });
}

describe('prepareCorpus in a child process', () => {
  it('restarts cleanly after being killed mid-way, producing exactly the output of an uninterrupted run', async () => {
    const file = join(root, 'kill.jsonl');
    writeJsonl(file, makeDocs(1500, 3));
    const dataDir = freshDir();
    const options = { name: 'k', files: [file], dataDir, seed: 5, valFraction: 0.05, workers: 2, batchChars: 2000, journalEveryMs: 0 };
    const killed = await runChild({ ...options, killAfterCheckpoints: 4 });
    expect(killed.signal).toBe('SIGKILL');
    const dir = join(dataDir, 'k');
    expect(existsSync(join(dir, 'train.bin'))).toBe(false);
    expect(existsSync(join(dir, 'val.bin'))).toBe(false);
    expect(existsSync(join(dir, 'train.bin.partial'))).toBe(true);
    const journal = JSON.parse(readFileSync(join(dir, 'prepare.journal.json'), 'utf8')) as { documents: number };
    expect(journal.documents).toBeGreaterThan(0);
    expect(journal.documents).toBeLessThan(1500);
    // Garbage past the journal's point (a write the journal never recorded) must be cut off.
    const fd = openSync(join(dir, 'train.bin.partial'), 'a');
    writeSync(fd, Buffer.from([1, 2, 3, 4, 5]));
    closeSync(fd);

    const lines: string[] = [];
    const resumed = await prepareCorpus({ ...options, log: (line) => lines.push(line), progressStream: quiet.progressStream });
    expect(resumed.resumed).toBe(true);
    expect(lines[0]).toMatch(/resuming an interrupted run/);
    const referenceDir = freshDir();
    const reference = await prepareCorpus({ ...options, dataDir: referenceDir, ...quiet });
    expect(resumed).toEqual({ ...reference, resumed: true });
    for (const name of ['train.bin', 'val.bin']) {
      expect(readFileSync(join(dir, name)).equals(readFileSync(join(referenceDir, 'k', name)))).toBe(true);
    }
    expect(readdirSync(dir).sort()).toEqual(['train.bin', 'val.bin']);
  });

  it('starts over (and says so) when the inputs changed since the interrupted run', async () => {
    const file = join(root, 'changed.jsonl');
    writeJsonl(file, makeDocs(600, 4));
    const dataDir = freshDir();
    const options = { name: 'k', files: [file], dataDir, seed: 5, valFraction: 0.05, workers: 1, batchChars: 2000, journalEveryMs: 0 };
    expect((await runChild({ ...options, killAfterCheckpoints: 2 })).signal).toBe('SIGKILL');
    writeJsonl(file, makeDocs(300, 9));
    const lines: string[] = [];
    const result = await prepareCorpus({ ...options, log: (line) => lines.push(line), progressStream: quiet.progressStream });
    expect(result.resumed).toBe(false);
    expect(lines[0]).toMatch(/cannot be resumed .*starting over/);
    expect(result.trainTokens).toBe(expectedSplits(makeDocs(300, 9), 5, 0.05).train.length);
  });

  it('keeps memory bounded: peak RSS does not grow with the corpus (150 MB vs 15 MB of text)', async () => {
    // Char tokens (2 bytes per character) of the big corpus would be another ~300 MB if they were held.
    const limitMB = 600;
    const maxGrowthMB = 80;
    const words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'];
    const peak = async (corpusMB: number): Promise<number> => {
      const file = join(root, `big-${corpusMB}.jsonl`);
      const fd = openSync(file, 'w');
      for (let d = 0; d < corpusMB * 100; d++) {
        let text = '';
        while (text.length < 10_000) text += `${words[(d * 7 + text.length) % words.length]} `;
        writeSync(fd, `${JSON.stringify({ text })}\n`);
      }
      closeSync(fd);
      // One worker: the reader is faster than the tokenizer, so only backpressure keeps batches from piling up.
      // A small old space makes V8 collect rather than grow its heap with the run's length, which otherwise
      // moves peak RSS by tens of MiB between runs; held token arrays live outside that heap and still show.
      const { output } = await runChild({ name: 'big', files: [file], tokenizer: 'char', dataDir: freshDir(), workers: 1 }, ['--max-old-space-size=64']);
      rmSync(file);
      expect(output!.trainTokens + output!.valTokens).toBeGreaterThan(corpusMB * 1e6);
      return output!.peakRss / 2 ** 20;
    };
    const small = await peak(15);
    const big = await peak(150);
    console.log(`memory test: peak RSS ${small.toFixed(0)} MiB for 15 MB, ${big.toFixed(0)} MiB for 150 MB (limits: ${limitMB} MiB, growth ${maxGrowthMB} MiB)`);
    expect(big).toBeLessThan(limitMB);
    expect(big - small).toBeLessThan(maxGrowthMB);
  });
});
