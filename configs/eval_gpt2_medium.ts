// Evaluate OpenAI's gpt2-medium on OpenWebText (needs `data/openwebtext/{train,val}.bin`).
// n_layer=24, n_head=16, n_embd=1024
// 350M parameters
import type { TrainConfig } from '../ts/config.ts';

export default {
  batch_size: 8,
  eval_iters: 500, // use more iterations to get good estimate
  eval_only: true,
  wandb_log: false,
  init_from: 'gpt2-medium',
} satisfies Partial<TrainConfig>;
