// Evaluate OpenAI's gpt2-xl on OpenWebText (needs `data/openwebtext/{train,val}.bin`).
// n_layer=48, n_head=25, n_embd=1600
// 1558M parameters
import type { TrainConfig } from '../ts/config.ts';

export default {
  batch_size: 8,
  eval_iters: 500, // use more iterations to get good estimate
  eval_only: true,
  wandb_log: false,
  init_from: 'gpt2-xl',
} satisfies Partial<TrainConfig>;
