// Token data without a file system, shared by the CLI and the browser page: nanoGPT's character tokenizer, its
// 90/10 split, and get_batch over any source of token windows.
import { UserError } from './errors.ts';
import { Rng } from './rng.ts';

export interface Meta {
  vocab_size: number;
  itos: Record<string, string>;
  stoi: Record<string, number>;
}

/** nanoGPT's character-level tokenizer: the vocabulary is the sorted set of characters (by code point). */
export class CharTokenizer {
  private readonly stoi: Map<string, number>;

  private constructor(private readonly itos: readonly string[]) {
    this.stoi = new Map(itos.map((char, id) => [char, id]));
  }

  static fromText(text: string): CharTokenizer {
    const chars = [...new Set(text)].sort((a, b) => a.codePointAt(0)! - b.codePointAt(0)!);
    return new CharTokenizer(chars);
  }

  static fromMeta(meta: Meta): CharTokenizer {
    return new CharTokenizer(Array.from({ length: meta.vocab_size }, (_, id) => meta.itos[id] ?? ''));
  }

  get vocabSize(): number {
    return this.itos.length;
  }

  /** The whole vocabulary in id order. */
  get characters(): string {
    return this.itos.join('');
  }

  encode(text: string): Uint16Array {
    const chars = [...text];
    const ids = new Uint16Array(chars.length);
    chars.forEach((char, i) => {
      const id = this.stoi.get(char);
      if (id === undefined) {
        const code = `U+${char.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}`;
        throw new UserError(`character ${JSON.stringify(char)} (${code}) is not in the ${this.vocabSize}-character vocabulary of this model; remove it from the prompt`);
      }
      ids[i] = id;
    });
    return ids;
  }

  decode(ids: ArrayLike<number>): string {
    return Array.from(ids, (id) => this.itos[id]).join('');
  }

  toMeta(): Meta {
    return {
      vocab_size: this.vocabSize,
      itos: Object.fromEntries(this.itos.map((char, id) => [id, char])),
      stoi: Object.fromEntries(this.stoi),
    };
  }
}

/** data/shakespeare_char/prepare.py on any text: its vocabulary, then the first 90% of the characters train. */
export function encodeCharDataset(text: string): { tokenizer: CharTokenizer; train: Uint16Array; val: Uint16Array } {
  const tokenizer = CharTokenizer.fromText(text);
  const ids = tokenizer.encode(text);
  const split = Math.floor(ids.length * 0.9);
  return { tokenizer, train: ids.subarray(0, split), val: ids.subarray(split) };
}

export type Split = 'train' | 'val';

export interface Batch {
  /** batch_size rows of block_size input ids, row-major. */
  x: Uint32Array;
  /** The same windows shifted by one token: the targets. */
  y: Int32Array;
}

/** What a batch is for: a training step's micro-step, or an evaluation of the loss on a split. */
export type BatchUse = 'step' | 'eval';

/**
 * The generator of batch number `position` of the batches `use` draws from `split`, in a run seeded `seed`. nanoGPT
 * draws every batch from one stream, which starts over when a run resumes; one generator per batch lets a resumed run
 * draw the batches the run it resumes would have drawn next, and keeps the evaluations from measuring the loss on
 * the very batches the steps train on.
 */
export function batchRng(seed: number, split: Split, use: BatchUse, position: number): Rng {
  const substream = (split === 'train' ? 0 : 2) + (use === 'step' ? 0 : 1);
  return new Rng(seed, substream, position);
}

/**
 * nanoGPT's get_batch: each row is a window at a uniformly random offset in [0, tokens - block_size), drawn with
 * replacement from `rng`; `window(offset)` gives the block_size + 1 tokens from that offset.
 */
export function sampleBatch(
  tokens: number,
  batchSize: number,
  blockSize: number,
  rng: Rng,
  window: (offset: number) => ArrayLike<number>,
): Batch {
  const T = blockSize;
  const x = new Uint32Array(batchSize * T);
  const y = new Int32Array(batchSize * T);
  for (let row = 0; row < batchSize; row++) {
    const ids = window(rng.nextInt(tokens - T));
    for (let t = 0; t < T; t++) {
      x[row * T + t] = ids[t];
      y[row * T + t] = ids[t + 1];
    }
  }
  return { x, y };
}
