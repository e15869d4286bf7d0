// Evaluate OpenAI's gpt2-large on OpenWebText (needs `data/openwebtext/{train,val}.bin`).
// n_layer=36, n_head=20, n_embd=1280
// 774M parameters
import type { TrainConfig } from '../ts/config.ts';

export default {
  batch_size: 8,
  eval_iters: 500, // use more iterations to get good estimate
  eval_only: true,
  wandb_log: false,
  init_from: 'gpt2-large',
} satisfies Partial<TrainConfig>;
