// One tokenising thread of `prepareCorpus` (corpus.ts). It receives batches of documents and answers with their
// uint16 token ids, concatenated, plus each document's length; for GPT-2 every document ends with <|endoftext|>.
import { parentPort, workerData } from 'node:worker_threads';
import { CharTokenizer } from './data.ts';
import { endOfText, gpt2Tokenizer } from './tokenizer.ts';

export interface WorkerInit {
  tokenizer: 'gpt2' | 'char';
  /** The character vocabulary, in id order (char tokenizer only). */
  chars?: string;
}

export interface TokenizeTask {
  id: number;
  docs: string[];
}

export interface TokenizeReply {
  id: number;
  /** All documents' ids, one after another. */
  tokens: Uint16Array;
  /** Token count of each document (EOT included). */
  lengths: Uint32Array;
  /** UTF-8 bytes of text in the batch, for progress. */
  textBytes: number;
  error?: string;
}

const init = workerData as WorkerInit;
const encodeDoc: (text: string) => ArrayLike<number> =
  init.tokenizer === 'char'
    ? ((chars) => (text: string) => chars.encode(text))(CharTokenizer.fromText(init.chars ?? ''))
    : (text: string) => gpt2Tokenizer.encodeOrdinary(text);
const eot = init.tokenizer === 'gpt2';

parentPort!.on('message', (task: TokenizeTask) => {
  try {
    const encoded = task.docs.map(encodeDoc);
    const lengths = new Uint32Array(encoded.length);
    let total = 0;
    let textBytes = 0;
    encoded.forEach((ids, i) => {
      lengths[i] = ids.length + (eot ? 1 : 0);
      total += lengths[i];
      textBytes += Buffer.byteLength(task.docs[i]);
    });
    const tokens = new Uint16Array(total);
    let at = 0;
    for (const ids of encoded) {
      tokens.set(ids, at);
      at += ids.length;
      if (eot) tokens[at++] = endOfText;
    }
    const reply: TokenizeReply = { id: task.id, tokens, lengths, textBytes };
    parentPort!.postMessage(reply, [tokens.buffer, lengths.buffer]);
  } catch (err) {
    const reply: TokenizeReply = {
      id: task.id,
      tokens: new Uint16Array(0),
      lengths: new Uint32Array(0),
      textBytes: 0,
      error: err instanceof Error ? err.message : String(err),
    };
    parentPort!.postMessage(reply);
  }
});
