// Sampling speed: this engine's decode path against nanoGPT's sample.py loop (bench/torch_ref.py sample: one
// sequence after another, a full forward pass over the cropped context per token), in one command, at each shape
// and on each engine build. Weights are random: the work per token does not depend on them. Each side's figure is its
// best of `--trials` runs (3 by default), as a shared machine's speed drifts between runs; the sides take turns, a run
// each per round (its ratios printed), so that the drift falls on all of them alike. RSS is the process's, from after
// the warm-ups to the end.
// Usage: npm run bench:sample [-- --engines=native,wasm] [--shapes=recipe,char] [--trials=3] [--quick]
//        npm run bench:sample -- --device=cuda --shapes=gpt2-xl   (the CUDA build in bfloat16, against torch's autocast)
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Engine, type EngineChoice, type ModelArgs } from '../ts/engine.ts';

const allShapes = {
  recipe: { name: 'README CPU recipe (4 x 128, block 64)', n_layer: 4, n_head: 4, n_embd: 128, block_size: 64, vocab_size: 65, samples: 10, tokens: 500 },
  char: { name: 'GPU shakespeare_char config (6 x 384, block 256)', n_layer: 6, n_head: 6, n_embd: 384, block_size: 256, vocab_size: 65, samples: 2, tokens: 300 },
  'gpt2-xl': { name: 'GPT-2 XL shape (48 x 1600, block 1024)', n_layer: 48, n_head: 25, n_embd: 1600, block_size: 1024, vocab_size: 50257, samples: 2, tokens: 100 },
};
type ShapeName = keyof typeof allShapes;
const args = process.argv.slice(2);
const option = (key: string) => args.find((a) => a.startsWith(`--${key}=`))?.slice(key.length + 3);
const device = option('device') ?? 'cpu';
const onGpu = device.startsWith('cuda');
const engines = (option('engines') ?? (onGpu ? 'native' : 'native,wasm')).split(',') as EngineChoice[];
const shapeNames = (option('shapes') ?? (onGpu ? 'gpt2-xl' : 'recipe,char')).split(',');
for (const name of shapeNames) {
  if (!(name in allShapes)) throw new Error(`unknown shape ${name}: use ${Object.keys(allShapes).join(', ')}`);
}
const shapes = shapeNames.map((name) => allShapes[name as ShapeName]);
const quick = args.includes('--quick');
const trials = Number(option('trials') ?? 3);
if (!Number.isInteger(trials) || trials < 1) throw new Error(`--trials=${option('trials')}: give a whole number of runs, 1 or more`);
const torchRef = fileURLToPath(new URL('./torch_ref.py', import.meta.url));
const rssMiB = () => process.memoryUsage().rss / 2 ** 20;

interface Row { shape: string; side: string; tokensPerS: number; note: string }
const rows: Row[] = [];

for (const shape of shapes) {
  const tokens = quick ? Math.ceil(shape.tokens / 5) : shape.tokens;
  const modelArgs: ModelArgs = { n_layer: shape.n_layer, n_head: shape.n_head, n_embd: shape.n_embd, block_size: shape.block_size, vocab_size: shape.vocab_size, bias: false, dropout: 0 };
  console.log(`\n==== ${shape.name}: ${shape.samples} samples x ${tokens} tokens ====`);
  const seeds = Uint32Array.from({ length: shape.samples }, (_, i) => 1000 + i);
  const torchRun = (): number => {
    const out = execFileSync('python3', [torchRef, 'sample', `--device=${device}`, '--compile=0', `--n_layer=${shape.n_layer}`, `--n_head=${shape.n_head}`,
      `--n_embd=${shape.n_embd}`, `--block_size=${shape.block_size}`, `--vocab_size=${shape.vocab_size}`, `--num_samples=${shape.samples}`, `--max_new_tokens=${tokens}`], { encoding: 'utf8' });
    return JSON.parse(out.split('\n').find((l) => l.startsWith('RESULT '))!.slice('RESULT '.length)).tokens_per_s;
  };
  const ours = engines.map((kind) => {
    const engine = Engine.create(modelArgs, 1337, device, kind);
    if (onGpu) engine.setPrecision('bfloat16');
    engine.generateBatch(Uint32Array.of(0), seeds, 8, 0.8, 200); // warm-up: thread pool, page faults
    return { kind, engine, tps: 0 };
  });
  const oursRun = (engine: Engine): number => {
    const t0 = performance.now();
    const sequences = engine.generateBatch(Uint32Array.of(0), seeds, tokens, 0.8, 200);
    const seconds = (performance.now() - t0) / 1e3;
    if (sequences.length !== shape.samples || sequences[0].length !== tokens + 1) throw new Error('generateBatch returned the wrong shape');
    return (shape.samples * tokens) / seconds;
  };
  // The sides take turns, one run each per round, so that a drift in the machine's speed falls on all of them.
  const rssBefore = rssMiB();
  let torchTps = NaN;
  let torchMissing = '';
  for (let round = 0; round < trials; round++) {
    const line: string[] = [];
    let torchNow = NaN;
    if (!torchMissing) {
      try {
        torchNow = torchRun();
        torchTps = Number.isNaN(torchTps) ? torchNow : Math.max(torchTps, torchNow);
        line.push(`torch_ref.py ${torchNow.toFixed(1)}`);
      } catch (err) {
        torchMissing = String(err).split('\n')[0];
        console.log(`torch_ref.py could not run (${torchMissing}); pip install torch numpy for the reference`);
      }
    }
    for (const side of ours) {
      const tps = oursRun(side.engine);
      side.tps = Math.max(side.tps, tps);
      line.push(`${side.kind} ${tps.toFixed(1)}` + (Number.isNaN(torchNow) ? '' : ` (x${(tps / torchNow).toFixed(2)})`));
    }
    console.log(`round ${round + 1} of ${trials}, tokens/s: ${line.join(', ')}`);
  }
  const note = `RSS ${rssBefore.toFixed(0)} -> ${rssMiB().toFixed(0)} MiB`;
  if (!torchMissing) rows.push({ shape: shape.name, side: 'PyTorch (nanoGPT sample.py loop)', tokensPerS: torchTps, note: '' });
  for (const { kind, tps } of ours) {
    rows.push({ shape: shape.name, side: `nanogpt-rs ${kind}`, tokensPerS: tps, note });
    const ratio = tps / torchTps;
    console.log(`RESULT ${JSON.stringify({ shape: shape.name, engine: kind, tokens_per_s: Math.round(tps * 10) / 10, torch_tokens_per_s: torchTps, ratio: Number.isFinite(ratio) ? Math.round(ratio * 100) / 100 : null })}`);
  }
}

console.log(`\n==== summary (tokens/s, best of ${trials} runs each, taking turns; ratio = ours / PyTorch in this run) ====`);
for (const shape of shapes) {
  const torch = rows.find((r) => r.shape === shape.name && r.side.startsWith('PyTorch'))?.tokensPerS ?? NaN;
  for (const row of rows.filter((r) => r.shape === shape.name)) {
    const ratio = row.side.startsWith('PyTorch') ? '1.00' : Number.isFinite(torch) ? (row.tokensPerS / torch).toFixed(2) : 'n/a';
    console.log(`${row.shape.padEnd(50)} ${row.side.padEnd(34)} ${row.tokensPerS.toFixed(1).padStart(9)}  x${ratio}  ${row.note}`);
  }
}
