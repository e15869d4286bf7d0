// The config keys of `train` and `sample`: their kinds, defaults and help. No file system here, so that the
// browser page reads the same defaults as the CLI (config.ts adds config files and --key=value parsing).
export type Kind = 'int' | 'float' | 'bool' | 'str';
export interface KindValue {
  int: number;
  float: number;
  bool: boolean;
  str: string;
}
export interface KeySpec<K extends Kind = Kind> {
  kind: K;
  default: KindValue[K];
  help: string;
  choices?: readonly string[];
}
export type Schema = Record<string, KeySpec>;
export type ConfigOf<S extends Schema> = { [K in keyof S]: KindValue[S[K]['kind']] };

const int = (value: number, help: string): KeySpec<'int'> => ({ kind: 'int', default: value, help });
const float = (value: number, help: string): KeySpec<'float'> => ({ kind: 'float', default: value, help });
const bool = (value: boolean, help: string): KeySpec<'bool'> => ({ kind: 'bool', default: value, help });
const str = (value: string, help: string, choices?: readonly string[]): KeySpec<'str'> => ({
  kind: 'str',
  default: value,
  help,
  ...(choices ? { choices } : {}),
});

const dtypes = ['float32', 'bfloat16', 'float16'] as const;

/** `auto` picks wasm for the cpu device and the native addon otherwise. */
export const engineChoices = ['auto', 'wasm', 'native'] as const;

/**
 * train.py's globals, in its order; the defaults train GPT-2 124M on OpenWebText. `device` defaults to
 * cpu here; config.ts's `trainSchema` has this machine's default.
 */
export const trainKeys = {
  out_dir: str('out', 'checkpoint directory'),
  eval_interval: int(2000, 'evaluate (and maybe checkpoint) every N iterations'),
  log_interval: int(1, 'print the training loss every N iterations'),
  eval_iters: int(200, 'batches per split when evaluating'),
  eval_only: bool(false, 'stop right after the first evaluation'),
  always_save_checkpoint: bool(true, 'checkpoint after every evaluation, even if val loss did not improve'),
  init_from: str('scratch', "'scratch', 'resume' (from out_dir), gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face GPT-2 folder"),
  wandb_log: bool(false, 'also log to Weights & Biases (needs WANDB_API_KEY and the @wandb/sdk package)'),
  wandb_project: str('owt', 'Weights & Biases project'),
  wandb_run_name: str('gpt2', 'Weights & Biases run name'),
  dataset: str('openwebtext', 'data is read from <data_dir>/<dataset>/'),
  gradient_accumulation_steps: int(40, 'micro-batches per optimizer step'),
  batch_size: int(12, 'micro-batch size'),
  block_size: int(1024, 'context length in tokens'),
  n_layer: int(12, 'transformer blocks'),
  n_head: int(12, 'attention heads'),
  n_embd: int(768, 'embedding width'),
  dropout: float(0.0, 'dropout rate (0.1+ suits finetuning)'),
  bias: bool(false, 'biases in Linear and LayerNorm layers'),
  learning_rate: float(6e-4, 'peak learning rate'),
  max_iters: int(600000, 'last iteration (max_iters + 1 optimizer steps in all)'),
  weight_decay: float(1e-1, 'AdamW weight decay of the matrices and embeddings'),
  beta1: float(0.9, 'AdamW beta1'),
  beta2: float(0.95, 'AdamW beta2'),
  grad_clip: float(1.0, 'clip gradients at this global norm; 0 disables clipping'),
  decay_lr: bool(true, 'warm up then cosine-decay the learning rate; False keeps it constant'),
  warmup_iters: int(2000, 'linear warmup iterations'),
  lr_decay_iters: int(600000, 'iteration where the learning rate reaches min_lr'),
  min_lr: float(6e-5, 'floor of the learning rate'),
  backend: str('nccl', "DDP backend (no effect: data-parallel runs use NCCL on cuda and MPI on cpu)"),
  zero_stage: int(0, 'data-parallel runs: 1 shards the AdamW state over the ranks (ZeRO stage 1), 0 keeps all of it on each'),
  ddp_timeout: float(600, 'seconds a rank of a data-parallel run waits in one all-reduce, broadcast or barrier for the others before it stops the job (one of them hangs)'),
  device: str('cpu', "'cpu', or 'cuda' / 'cuda:N' (the default where a GPU and the CUDA build are present)"),
  engine: str('auto', "engine build: 'wasm' (portable, cpu), 'native' (napi addon), 'auto' = wasm on cpu, native otherwise", engineChoices),
  dtype: str('bfloat16', 'compute precision on a GPU: float32 (TF32 matmuls), bfloat16 or float16 (loss-scaled); cpu computes in float32', dtypes),
  compile: bool(true, 'torch.compile in nanoGPT (no effect here)'),
  seed: int(1337, 'seeds model initialisation and batch sampling'),
  data_dir: str('data', 'folder holding the prepared datasets'),
} satisfies Schema;

/** sample.py's globals; `device` as in `trainKeys`. */
export const sampleKeys = {
  init_from: str('resume', "'resume' (from out_dir), gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face GPT-2 folder"),
  out_dir: str('out', 'checkpoint directory'),
  start: str('\n', "prompt text ('<|endoftext|>' is GPT-2's special token), or 'FILE:<path>' to read it from a file"),
  num_samples: int(10, 'samples to draw'),
  max_new_tokens: int(500, 'tokens generated per sample'),
  temperature: float(0.8, '< 1 is more conservative, > 1 more random; must be > 0'),
  top_k: int(200, 'sample only among the k most likely tokens; 0 = all'),
  seed: int(1337, 'seeds the sampling'),
  device: str('cpu', "'cpu', or 'cuda' / 'cuda:N' (the default where a GPU and the CUDA build are present)"),
  engine: str('auto', "engine build: 'wasm' (portable, cpu), 'native' (napi addon), 'auto' = wasm on cpu, native otherwise", engineChoices),
  dtype: str('bfloat16', 'compute precision on a GPU: float32, bfloat16 or float16; cpu computes in float32', dtypes),
  compile: bool(false, 'torch.compile in nanoGPT (no effect here)'),
  data_dir: str('data', "folder holding the prepared datasets (for the vocabulary in meta.json; without one, GPT-2's)"),
} satisfies Schema;

export type TrainConfig = ConfigOf<typeof trainKeys>;
export type SampleConfig = ConfigOf<typeof sampleKeys>;

export function defaultsOf<S extends Schema>(schema: S): ConfigOf<S> {
  return Object.fromEntries(Object.entries(schema).map(([key, spec]) => [key, spec.default])) as ConfigOf<S>;
}
