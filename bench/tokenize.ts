// GPT-2 tokenisation throughput: js-tiktoken on one thread in-process (the reference) vs prepareCorpus's pipeline
// (read jsonl -> worker threads -> train/val.bin) with 1 worker and with all cores.
// Usage: npx tsx bench/tokenize.ts [MB=20]  (text = this repository's sources and docs, repeated into documents)
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tiktoken } from 'js-tiktoken/lite';
import gpt2Ranks from 'js-tiktoken/ranks/gpt2';
import { prepareCorpus } from '../ts/corpus.ts';

const targetMB = Number(process.argv[2] ?? 20);
const root = new URL('..', import.meta.url).pathname;
const sources: string[] = [];
for (const dir of ['ts', 'test', 'crates/nanogpt-core/src', 'bench']) {
  try {
    for (const name of readdirSync(join(root, dir))) {
      const path = join(root, dir, name);
      if (statSync(path).isFile() && /\.(ts|rs|md|txt)$/.test(name)) sources.push(readFileSync(path, 'utf8'));
    }
  } catch {}
}
const docs: string[] = [];
let bytes = 0;
for (let i = 0; bytes < targetMB * 1e6; i++) {
  const source = sources[i % sources.length];
  const start = (i * 7919) % Math.max(1, source.length - 1);
  const doc = source.slice(start, start + 2000 + ((i * 131) % 8000));
  docs.push(doc);
  bytes += Buffer.byteLength(doc);
}
const mb = bytes / 1e6;
const dir = mkdtempSync(join(tmpdir(), 'nanogpt-bench-'));
const file = join(dir, 'docs.jsonl');
writeFileSync(file, docs.map((text) => JSON.stringify({ text })).join('\n'));
console.log(`${mb.toFixed(1)} MB in ${docs.length} documents; ${availableParallelism()} cores; load average ${loadavg()[0].toFixed(2)}`);

const encoding = new Tiktoken(gpt2Ranks);
let t0 = performance.now();
let tokens = 0;
for (const doc of docs) tokens += encoding.encode(doc, [], []).length + 1;
const reference = mb / ((performance.now() - t0) / 1000);
console.log(`js-tiktoken, 1 thread in-process: ${reference.toFixed(2)} MB/s (${tokens.toLocaleString('en-US')} tokens)`);

const quiet = { log: () => {}, progressStream: { write: () => true, isTTY: false } };
const rates: [string, number][] = [];
for (const workers of [1, availableParallelism()]) {
  t0 = performance.now();
  const result = await prepareCorpus({ name: `w${workers}`, files: [file], dataDir: dir, workers, ...quiet });
  const rate = mb / ((performance.now() - t0) / 1000);
  if (result.trainTokens + result.valTokens !== tokens) throw new Error(`pipeline wrote ${result.trainTokens + result.valTokens} tokens, expected ${tokens}`);
  rates.push([`pipeline, ${workers} worker${workers > 1 ? 's' : ''}`, rate]);
}
for (const [name, rate] of rates) console.log(`${name}: ${rate.toFixed(2)} MB/s (${(rate / reference).toFixed(2)}x js-tiktoken)`);
console.log(`all workers vs 1 worker: ${(rates[1][1] / rates[0][1]).toFixed(2)}x`);
rmSync(dir, { recursive: true, force: true });
