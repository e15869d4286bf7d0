// Evaluate OpenAI's gpt2 on OpenWebText (needs `data/openwebtext/{train,val}.bin`).
// n_layer=12, n_head=12, n_embd=768
// 124M parameters
import type { TrainConfig } from '../ts/config.ts';

export default {
  batch_size: 8,
  eval_iters: 500, // use more iterations to get good estimate
  eval_only: true,
  wandb_log: false,
  init_from: 'gpt2',
} satisfies Partial<TrainConfig>;
