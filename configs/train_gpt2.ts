// Train GPT-2 (124M) on OpenWebText: 12 * 1024 * 40 = 491,520 tokens per iteration, 600k iterations (~300B tokens).
// Needs `data/openwebtext/{train,val}.bin` (nanoGPT's openwebtext/prepare.py output is compatible).
import type { TrainConfig } from '../ts/config.ts';

export default {
  wandb_log: true,
  wandb_project: 'owt',
  wandb_run_name: 'gpt2-124M',

  batch_size: 12,
  block_size: 1024,
  gradient_accumulation_steps: 5 * 8,

  max_iters: 600000,
  lr_decay_iters: 600000,

  eval_interval: 1000,
  eval_iters: 200,
  log_interval: 10,

  weight_decay: 1e-1,
} satisfies Partial<TrainConfig>;
