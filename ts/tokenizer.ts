// GPT-2's byte-pair encoding (tiktoken's "gpt2"), for datasets without a character vocabulary and for OpenAI's
// GPT-2 weights. The ranks ship inside js-tiktoken, so encoding works offline.
import { Tiktoken } from 'js-tiktoken/lite';
import gpt2Ranks from 'js-tiktoken/ranks/gpt2';

/** The id of `<|endoftext|>`; the vocabulary has one more token than this. */
export const endOfText = 50256;
export const gpt2VocabSize = 50257;

let encoding: Tiktoken | undefined;

/** Building the rank table takes a noticeable fraction of a second, so it is built on first use only. */
function gpt2(): Tiktoken {
  encoding ??= new Tiktoken(gpt2Ranks);
  return encoding;
}

export const gpt2Tokenizer = {
  /** tiktoken's encode_ordinary: `<|endoftext|>` in the text is plain text, as in nanoGPT's prepare.py files. */
  encodeOrdinary(text: string): number[] {
    return gpt2().encode(text, [], []);
  },

  /** As sample.py encodes a prompt: `<|endoftext|>` is the special token. */
  encode(text: string): number[] {
    return gpt2().encode(text, ['<|endoftext|>']);
  },

  /** Ids beyond the vocabulary (a model with nanoGPT's padded 50304 can sample them) decode to nothing. */
  decode(ids: ArrayLike<number>): string {
    return gpt2().decode(Array.from(ids));
  },
};
