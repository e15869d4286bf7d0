import { closeSync, copyFileSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BatchLoader, CharTokenizer, prepare, prepareCommand, readMeta, readTokens } from '../ts/data.ts';
import { Rng } from '../ts/rng.ts';
import { gpt2Tokenizer } from '../ts/tokenizer.ts';

const corpus = new URL('../data/shakespeare_char/input.txt', import.meta.url);
const root = mkdtempSync(join(tmpdir(), 'nanogpt-data-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe('prepare shakespeare_char', () => {
  const dir = join(root, 'shakespeare_char');
  const lines: string[] = [];
  beforeAll(async () => {
    mkdirSync(dir, { recursive: true });
    copyFileSync(corpus, join(dir, 'input.txt'));
    await prepare('shakespeare_char', { dataDir: root, log: (line) => lines.push(line) });
  });

  it('writes uint16 files of the sizes nanoGPT writes', () => {
    expect(statSync(join(dir, 'train.bin')).size).toBe(2_007_708);
    expect(statSync(join(dir, 'val.bin')).size).toBe(223_080);
  });

  it("prints prepare.py's lines", () => {
    expect(lines[0]).toBe('length of dataset in characters: 1,115,394');
    expect(lines.slice(2)).toEqual(['vocab size: 65', 'train has 1,003,854 tokens', 'val has 111,540 tokens']);
  });

  it('records the 65-character vocabulary in code-point order', () => {
    const meta = readMeta(dir)!;
    expect(meta.vocab_size).toBe(65);
    expect(meta.stoi['\n']).toBe(0);
    expect(meta.stoi[' ']).toBe(1);
    expect(meta.stoi['!']).toBe(2);
    expect(meta.stoi['3']).toBe(9);
    expect(meta.stoi['?']).toBe(12);
    expect(meta.stoi.A).toBe(13);
    expect(meta.stoi.Z).toBe(38);
    expect(meta.stoi.a).toBe(39);
    expect(meta.stoi.z).toBe(64);
    expect(meta.itos[12]).toBe('?');
  });

  it('splits 90/10 by position: train starts with "First Citizen", val with "?\\n\\nGREMIO:"', () => {
    const tokenizer = CharTokenizer.fromMeta(readMeta(dir)!);
    const firstChars = (file: string, n: number) => {
      const bytes = readFileSync(join(dir, file));
      return tokenizer.decode(Array.from({ length: n }, (_, i) => bytes.readUInt16LE(i * 2)));
    };
    expect(firstChars('train.bin', 13)).toBe('First Citizen');
    expect(firstChars('val.bin', 10)).toBe('?\n\nGREMIO:');
  });
});

describe('prepare shakespeare (GPT-2 BPE)', () => {
  const dir = join(root, 'shakespeare');
  const lines: string[] = [];
  beforeAll(async () => {
    // Reads the same input.txt as shakespeare_char (the block above put it there).
    mkdirSync(join(root, 'shakespeare_char'), { recursive: true });
    copyFileSync(corpus, join(root, 'shakespeare_char', 'input.txt'));
    await prepare('shakespeare', { dataDir: root, log: (line) => lines.push(line) });
  });

  it("writes nanoGPT's token counts, and no meta.json", () => {
    expect(lines).toEqual(['train has 301,966 tokens', 'val has 36,059 tokens']);
    expect(statSync(join(dir, 'train.bin')).size).toBe(301_966 * 2);
    expect(statSync(join(dir, 'val.bin')).size).toBe(36_059 * 2);
    expect(readMeta(dir)).toBeUndefined();
  });

  it('decodes back to the corpus, split at the same character as shakespeare_char', () => {
    const text = readFileSync(corpus, 'utf8');
    const decode = (file: string) => {
      const bytes = readFileSync(join(dir, file));
      return gpt2Tokenizer.decode(Array.from({ length: bytes.length / 2 }, (_, i) => bytes.readUInt16LE(i * 2)));
    };
    const split = Math.floor(text.length * 0.9);
    expect(decode('train.bin')).toBe(text.slice(0, split));
    expect(decode('val.bin')).toBe(text.slice(split));
  });
});

describe('GPT-2 tokenizer', () => {
  it("encodes as tiktoken's gpt2 and round-trips", () => {
    expect(gpt2Tokenizer.encodeOrdinary('Hello world')).toEqual([15496, 995]);
    expect(gpt2Tokenizer.decode([15496, 995])).toBe('Hello world');
  });

  it('reads <|endoftext|> as the special token in prompts only', () => {
    expect(gpt2Tokenizer.encode('<|endoftext|>Hi')).toEqual([50256, 17250]);
    expect(gpt2Tokenizer.encodeOrdinary('<|endoftext|>')).not.toContain(50256);
  });
});

describe('CharTokenizer', () => {
  it('round-trips text and names a character outside the vocabulary', () => {
    const tokenizer = CharTokenizer.fromText('hello world');
    expect(tokenizer.characters).toBe(' dehlorw');
    expect(tokenizer.decode(tokenizer.encode('hello'))).toBe('hello');
    expect(() => tokenizer.encode('help')).toThrow('character "p" (U+0070) is not in the 8-character vocabulary');
  });

  it('survives a trip through meta.json', () => {
    const tokenizer = CharTokenizer.fromText('abc\né');
    const again = CharTokenizer.fromMeta(JSON.parse(JSON.stringify(tokenizer.toMeta())));
    expect(again.encode('é\ncab')).toEqual(tokenizer.encode('é\ncab'));
  });
});

describe('Rng', () => {
  it('is deterministic per seed and differs between seeds', () => {
    const draw = (seed: number) => {
      const rng = new Rng(seed);
      return Array.from({ length: 5 }, () => rng.nextUint32());
    };
    expect(draw(1337)).toEqual(draw(1337));
    expect(draw(1337)).not.toEqual(draw(1338));
  });

  it('gives each substream of a seed a stream of its own', () => {
    const draw = (...key: [number, ...number[]]) => {
      const rng = new Rng(...key);
      return Array.from({ length: 4 }, () => rng.nextUint32());
    };
    const streams = [draw(7), draw(7, 0, 0), draw(7, 0, 1), draw(7, 1, 0), draw(7, 0, 2 ** 40), draw(8, 0, 1), draw(0), draw(0, 0), draw(0, 0, 0)].map((s) => s.join());
    expect(new Set(streams).size).toBe(streams.length);
    expect(draw(7, 0, 2 ** 40)).toEqual(draw(7, 0, 2 ** 40));
  });

  it('draws integers uniformly, including beyond 2^32', () => {
    const rng = new Rng(1);
    const counts = new Array(10).fill(0);
    for (let i = 0; i < 100_000; i++) counts[rng.nextInt(10)]++;
    for (const count of counts) expect(Math.abs(count - 10_000)).toBeLessThan(500);
    const big = Array.from({ length: 1000 }, () => rng.nextInt(2 ** 40));
    expect(Math.max(...big)).toBeGreaterThan(2 ** 39);
    expect(big.every((n) => Number.isInteger(n) && n >= 0 && n < 2 ** 40)).toBe(true);
  });
});

describe('BatchLoader', () => {
  const dir = join(root, 'counting');
  beforeAll(() => {
    // Token i holds i % 65536, so every window shows where it was read from.
    mkdirSync(dir, { recursive: true });
    const tokens = 100_000;
    const bytes = Buffer.alloc(tokens * 2);
    for (let i = 0; i < tokens; i++) bytes.writeUInt16LE(i % 65536, i * 2);
    writeFileSync(join(dir, 'train.bin'), bytes);
    writeFileSync(join(dir, 'val.bin'), bytes.subarray(0, 2000));
  });

  it('reads consecutive windows with y = x shifted by one', () => {
    const loader = new BatchLoader(dir, 4, 16, 1337);
    const { x, y } = loader.step(0);
    expect(x).toHaveLength(64);
    for (let row = 0; row < 4; row++) {
      const start = x[row * 16];
      for (let t = 0; t < 16; t++) {
        expect(x[row * 16 + t]).toBe((start + t) % 65536);
        expect(y[row * 16 + t]).toBe((start + t + 1) % 65536);
      }
    }
    loader.close();
  });

  it('keeps every window inside the split, and gives a position the same batch for a seed, whatever came before', () => {
    type Draw = 'step' | 'eval train' | 'eval val';
    const starts = (seed: number, draw: Draw, positions: number[]) => {
      const loader = new BatchLoader(dir, 64, 16, seed);
      const batches = positions.map((position) => (draw === 'step' ? loader.step(position) : loader.evaluation(draw === 'eval train' ? 'train' : 'val', position)).x);
      loader.close();
      return Array.from({ length: 64 }, (_, row) => batches.at(-1)![row * 16]);
    };
    const first = starts(7, 'eval val', [3]);
    expect(first.every((start) => start >= 0 && start < 1000 - 16)).toBe(true);
    expect(starts(7, 'eval val', [0, 1, 2, 3])).toEqual(first);
    expect(starts(7, 'eval val', [4])).not.toEqual(first);
    expect(starts(8, 'eval val', [3])).not.toEqual(first);
    expect(starts(7, 'step', [3])).not.toEqual(starts(7, 'step', [2]));
    // The evaluations of the training split do not measure the batches the steps train on.
    expect(starts(7, 'eval train', [3])).not.toEqual(starts(7, 'step', [3]));
  });

  it('tells the user to run prepare when the dataset is missing, in its data_dir, with their own files where it is theirs', () => {
    expect(() => new BatchLoader(join(root, 'openwebtext'), 1, 8, 1)).toThrow(`run \`npx nanogpt-rs prepare openwebtext --data_dir=${root}\` first`);
    expect(() => new BatchLoader(join(root, 'poems'), 1, 8, 1)).toThrow(`run \`npx nanogpt-rs prepare text --name=poems --data_dir=${root} FILE...\` first`);
    expect(prepareCommand(join('data', 'shakespeare_char'))).toBe('npx nanogpt-rs prepare shakespeare_char');
    // A folder with a vocabulary was character-level; a data_dir with a space is quoted.
    const chars = join(root, 'my data', 'letters');
    mkdirSync(chars, { recursive: true });
    writeFileSync(join(chars, 'meta.json'), '{}');
    expect(prepareCommand(chars)).toBe(`npx nanogpt-rs prepare text --name=letters --data_dir='${join(root, 'my data')}' --tokenizer=char FILE...`);
  });

  it('rejects a block_size the data cannot fill', () => {
    expect(() => new BatchLoader(dir, 1, 1000, 1)).toThrow('too few for block_size 1000; lower --block_size');
  });

  it('refuses a .bin whose size is not a whole number of uint16 tokens, naming the file and its size', () => {
    const torn = join(root, 'torn');
    mkdirSync(torn, { recursive: true });
    writeFileSync(join(torn, 'train.bin'), Buffer.alloc(4001));
    writeFileSync(join(torn, 'val.bin'), Buffer.alloc(4000));
    expect(() => new BatchLoader(torn, 1, 8, 1)).toThrow(`${join(torn, 'train.bin')} holds 4001 bytes, not a whole number of uint16 tokens`);
  });
});

describe('readTokens beyond 4 GiB', () => {
  it('reads at byte offsets past 2^32 in a sparse 5 GiB file', () => {
    const path = join(root, 'huge.bin');
    const size = 5 * 2 ** 30;
    writeFileSync(path, '');
    truncateSync(path, size);
    const known = Buffer.alloc(8);
    [0xbeef, 0x1234, 0xffff, 42].forEach((v, i) => known.writeUInt16LE(v, i * 2));
    const fd = openSync(path, 'r+');
    try {
      writeSync(fd, known, 0, known.length, size - 16);
      const window = Buffer.alloc(8);
      readTokens(fd, (size - 16) / 2, window);
      expect(window).toEqual(known);
      readTokens(fd, 2 ** 31 + 5, window); // byte offset 2^32 + 10: still the zero hole
      expect(window).toEqual(Buffer.alloc(8));
      expect(() => readTokens(fd, size / 2 - 2, window)).toThrow('unexpected end of data file');
    } finally {
      closeSync(fd);
      rmSync(path);
    }
  });
});
