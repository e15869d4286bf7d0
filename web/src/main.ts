// The page: nanoGPT's README CPU recipe on shakespeare_char, trained by the WebAssembly engine in a worker, with
// a live loss chart, samples, and checkpoints in the CLI's folder format.
import shakespeareChar from '../../configs/train_shakespeare_char.ts';
import { defaultsOf, trainKeys, type TrainConfig } from '../../ts/schema.ts';
import type { FromWorker, ToWorker } from './messages.ts';
import { unzip, zip, type ZipEntry } from './zip.ts';

/** README's CPU recipe: the shakespeare_char config with a model and batches a laptop trains in minutes. */
const recipe: TrainConfig = {
  ...defaultsOf(trainKeys),
  ...shakespeareChar,
  eval_iters: 20,
  log_interval: 1,
  block_size: 64,
  batch_size: 12,
  n_layer: 4,
  n_head: 4,
  n_embd: 128,
  max_iters: 2000,
  lr_decay_iters: 2000,
  dropout: 0,
};
/** Keys the page lets the user change; lr_decay_iters follows max_iters, as the recipe has it. */
const editable = ['n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'max_iters', 'learning_rate', 'eval_interval', 'eval_iters', 'dropout'] as const;

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const status = (text: string, isError = false) => {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
};

// Threads need shared memory, which browsers give only to a cross-origin-isolated page.
const requestedThreads = Number(new URLSearchParams(location.search).get('threads')) || navigator.hardwareConcurrency || 1;
const threadsWanted = crossOriginIsolated ? requestedThreads : 1;

const worker = new Worker('/app/train-worker.js', { type: 'module' });
const send = (message: ToWorker, transfer: Transferable[] = []) => worker.postMessage(message, { transfer });

/** What the page has seen of the run: the chart's data, and what the browser test reads. */
const history = {
  threads: 0,
  iters: [] as Array<{ iter: number; loss: number; stepMs: number }>,
  evals: [] as Array<{ iter: number; train: number; val: number }>,
  samples: [] as string[],
  state: 'loading' as 'loading' | 'ready' | 'training' | 'stopped' | 'error',
};
(globalThis as { nanogptPage?: typeof history }).nanogptPage = history;
let training = false;
let maxIters = recipe.max_iters;

for (const key of editable) {
  const input = $<HTMLInputElement>(`key-${key}`);
  input.value = String(recipe[key]);
  input.title = trainKeys[key].help;
}

function readConfig(): TrainConfig {
  const config: TrainConfig = { ...recipe };
  for (const key of editable) {
    const input = $<HTMLInputElement>(`key-${key}`);
    const value = Number(input.value);
    const integer = trainKeys[key].kind === 'int';
    if (input.value.trim() === '' || !Number.isFinite(value) || (integer && (!Number.isInteger(value) || value < 1)) || value < 0) {
      throw new Error(`${key} must be ${integer ? 'a positive integer' : 'a number >= 0'}, got '${input.value}'`);
    }
    (config as Record<string, unknown>)[key] = value;
  }
  config.lr_decay_iters = config.max_iters;
  return config;
}

function setTraining(on: boolean): void {
  training = on;
  history.state = on ? 'training' : 'stopped';
  $('train').textContent = on ? 'Stop' : 'Train';
  for (const id of ['reset', 'sample', 'download', 'load']) $<HTMLButtonElement>(id).disabled = on;
}

$('train').onclick = () => {
  if (training) return send({ kind: 'stop' });
  startTraining(false);
};
$('reset').onclick = () => startTraining(true);

function startTraining(fresh: boolean): void {
  let config: TrainConfig;
  try {
    config = readConfig();
  } catch (err) {
    return status((err as Error).message, true);
  }
  if (fresh) {
    history.iters.length = 0;
    history.evals.length = 0;
    drawChart();
  }
  maxIters = config.max_iters;
  setTraining(true);
  status('training');
  send({ kind: 'train', config, fresh });
}

$('sample').onclick = () => send({ kind: 'sample', prompt: $<HTMLInputElement>('prompt').value || '\n', maxNewTokens: 500, seed: Date.now() % 2 ** 31 });
$('download').onclick = () => send({ kind: 'checkpoint' });
$('load').onclick = () => $<HTMLInputElement>('checkpoint-files').click();
$<HTMLInputElement>('checkpoint-files').onchange = async (event) => {
  const picked = [...((event.target as HTMLInputElement).files ?? [])];
  try {
    const files: ZipEntry[] = [];
    for (const file of picked) {
      const bytes = new Uint8Array(await file.arrayBuffer());
      files.push(...(file.name.endsWith('.zip') ? unzip(bytes) : [{ name: file.name, bytes }]));
    }
    send({ kind: 'load', files }, [...new Set(files.map((file) => file.bytes.buffer as ArrayBuffer))]);
  } catch (err) {
    status(`cannot read the checkpoint: ${(err as Error).message}`, true);
  }
};

// A dropped (or picked) text replaces the Shakespeare text: it must be UTF-8 text, long enough for block_size.
async function useTextFile(file: File): Promise<void> {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    if (text.includes('\0')) throw new Error('it holds NUL bytes');
  } catch {
    return status(`${file.name} is not a text file (not UTF-8 text); drop a plain .txt file`, true);
  }
  const name = file.name.replace(/\.[^.]*$/, '').replace(/[^\w-]+/g, '_') || 'text';
  status(`reading ${file.name}`);
  send({ kind: 'data', name, text, blockSize: Number($<HTMLInputElement>('key-block_size').value) });
}
const drop = $('drop');
drop.ondragover = (event) => {
  event.preventDefault();
  drop.classList.add('over');
};
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = (event) => {
  event.preventDefault();
  drop.classList.remove('over');
  const file = event.dataTransfer?.files[0];
  if (file) void useTextFile(file);
};
$<HTMLInputElement>('text-file').onchange = (event) => {
  const file = (event.target as HTMLInputElement).files?.[0];
  if (file) void useTextFile(file);
};

function download(name: string, bytes: Uint8Array): void {
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([bytes as BlobPart], { type: 'application/zip' }));
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

const format = (seconds: number) => (seconds >= 60 ? `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s` : `${Math.round(seconds)} s`);

worker.onmessage = ({ data }: MessageEvent<FromWorker>) => {
  switch (data.kind) {
    case 'engine':
      history.threads = data.threads;
      $('threads').textContent = `${data.build}, ${data.threads} thread${data.threads > 1 ? 's' : ''}${crossOriginIsolated ? '' : ' (the page is not cross-origin isolated)'}`;
      void fetch('/data/shakespeare_char/input.txt')
        .then((response) => response.text())
        .then((text) => send({ kind: 'data', name: 'shakespeare_char', text, blockSize: recipe.block_size }));
      return;
    case 'dataset':
      $('dataset').textContent = `${data.name}: ${data.trainTokens.toLocaleString('en-US')} train and ${data.valTokens.toLocaleString('en-US')} val characters, vocabulary of ${data.vocabSize}`;
      history.state = 'ready';
      $<HTMLButtonElement>('train').disabled = false;
      $<HTMLButtonElement>('reset').disabled = false;
      return status('ready');
    case 'model':
      $('model').textContent = `${(data.params / 1e6).toFixed(2)}M parameters${data.memoryBytes ? `, about ${(data.memoryBytes / 2 ** 20).toFixed(0)} MiB of engine memory` : ''}`;
      return;
    case 'iter':
      history.iters.push({ iter: data.iter, loss: data.loss, stepMs: data.stepMs });
      $('iter').textContent = `${data.iter} / ${maxIters}`;
      $('loss').textContent = data.loss.toFixed(4);
      $('speed').textContent = `${Math.round(data.tokensPerSecond).toLocaleString('en-US')} tokens/s (${data.stepMs.toFixed(0)} ms/iter)`;
      $('eta').textContent = format(data.etaSeconds);
      return drawChart();
    case 'eval':
      history.evals.push({ iter: data.iter, train: data.train, val: data.val });
      $('evals').textContent = `step ${data.iter}: train loss ${data.train.toFixed(4)}, val loss ${data.val.toFixed(4)}`;
      return drawChart();
    case 'sample':
      history.samples.push(data.text);
      $('samples').textContent = `— after ${data.iter} training steps —\n${data.text}`;
      return;
    case 'stopped':
      setTraining(false);
      $('eta').textContent = '';
      return status(data.finished ? `finished at iteration ${data.iter - 1}` : `stopped before iteration ${data.iter}; Train continues`);
    case 'checkpoint':
      download(`${data.folder}.zip`, zip(data.files.map((file) => ({ name: `${data.folder}/${file.name}`, bytes: file.bytes }))));
      return status(`checkpoint downloaded: unzip it, then \`npx nanogpt-rs sample --out_dir=${data.folder}\``);
    case 'loaded': {
      const args = data.info.model_args;
      for (const key of ['n_layer', 'n_head', 'n_embd', 'block_size'] as const) $<HTMLInputElement>(`key-${key}`).value = String(args[key]);
      history.iters.length = 0;
      history.evals.length = 0;
      drawChart();
      $<HTMLButtonElement>('sample').disabled = false;
      $<HTMLButtonElement>('download').disabled = false;
      return status(`loaded a checkpoint at iteration ${data.info.iter_num} (best val loss ${data.info.best_val_loss.toFixed(4)})${data.optimizer ? '; Train resumes it' : '; without optimizer.safetensors it samples only'}`);
    }
    case 'error':
      if (training) setTraining(false);
      if (history.state === 'loading') history.state = 'error';
      return status(data.message, true);
  }
};
worker.onerror = (event) => status(`the training worker failed: ${event.message}`, true);
send({ kind: 'engine', threads: threadsWanted });

/** Training loss per iteration, and the evaluated train and val losses, against the iteration. */
function drawChart(): void {
  const canvas = $<HTMLCanvasElement>('chart');
  const scale = devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = width * scale;
  canvas.height = height * scale;
  const g = canvas.getContext('2d')!;
  g.scale(scale, scale);
  g.clearRect(0, 0, width, height);
  const pad = { left: 44, right: 12, top: 12, bottom: 26 };
  // A diverging run's last losses may be NaN or infinite: the scale is of the finite ones, and a line breaks off where they end.
  const losses = [...history.iters.map((p) => p.loss), ...history.evals.flatMap((e) => [e.train, e.val])].filter(Number.isFinite);
  if (losses.length === 0) return;
  const low = Math.floor(Math.min(...losses) * 2) / 2;
  const high = Math.ceil(Math.max(...losses) * 2) / 2;
  const lastIter = Math.max(maxIters, history.iters.at(-1)?.iter ?? 0, 1);
  const x = (iter: number) => pad.left + (iter / lastIter) * (width - pad.left - pad.right);
  const y = (loss: number) => pad.top + ((high - loss) / Math.max(high - low, 1e-9)) * (height - pad.top - pad.bottom);
  g.font = '11px system-ui, sans-serif';
  g.fillStyle = '#666';
  g.strokeStyle = '#e4e4e4';
  for (let loss = low; loss <= high + 1e-9; loss += 0.5) {
    g.beginPath();
    g.moveTo(pad.left, y(loss));
    g.lineTo(width - pad.right, y(loss));
    g.stroke();
    g.fillText(loss.toFixed(1), 8, y(loss) + 4);
  }
  g.fillText('0', pad.left, height - 8);
  g.fillText(`iteration ${lastIter}`, width - pad.right - 80, height - 8);
  const line = (points: Array<[number, number]>, color: string, lineWidth: number) => {
    g.strokeStyle = color;
    g.lineWidth = lineWidth;
    g.beginPath();
    points.forEach(([iter, loss], i) => (i === 0 ? g.moveTo(x(iter), y(loss)) : g.lineTo(x(iter), y(loss))));
    g.stroke();
    g.fillStyle = color;
    if (points.length < 200) for (const [iter, loss] of points) g.fillRect(x(iter) - 2, y(loss) - 2, 4, 4);
  };
  const finite = (points: Array<[number, number]>) => points.filter(([, loss]) => Number.isFinite(loss));
  line(finite(history.iters.map((p) => [p.iter, p.loss])), '#9bb7d4', 1);
  line(finite(history.evals.map((e) => [e.iter, e.train])), '#1f5fa8', 2);
  line(finite(history.evals.map((e) => [e.iter, e.val])), '#d9741c', 2);
}
addEventListener('resize', drawChart);
