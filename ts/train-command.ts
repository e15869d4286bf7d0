// `nanogpt-rs train`: runs `train` and prints what it reports (a progress bar on a terminal). Ctrl-C asks the run
// to stop after the current step, with a checkpoint of it; a second Ctrl-C exits at once.
import { trainSchema, type TrainConfig } from './config.ts';
import { Progress } from './progress.ts';
import { launchRanks } from './ranks.ts';
import { train } from './train.ts';

export async function runTrainCommand(overrides: Partial<TrainConfig>): Promise<void> {
  // mpirun gives its ranks a pseudo-terminal whatever its own output is, so a run of several processes prints
  // nanoGPT's plain lines rather than a progress bar.
  const output = launchRanks().worldSize > 1 ? { write: process.stdout.write.bind(process.stdout), isTTY: false } : process.stdout;
  const stop = new AbortController();
  let progress: Progress | undefined;
  const print = (line: string) => (progress ? progress.print(line) : console.log(line));
  // Only the first Ctrl-C is caught: once its listener is gone, SIGINT's default action (exit) is back, so a second
  // one ends the process at once, even in the middle of a step or of the checkpoint save.
  const onSigint = () => {
    stop.abort();
    print('interrupted: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)');
  };
  process.once('SIGINT', onSigint);
  try {
    const result = await train(overrides, {
      signal: stop.signal,
      onLog: (event) => {
        if (event.kind === 'iter') {
          progress ??= new Progress(output, overrides.max_iters ?? trainSchema.max_iters.default);
          progress.log(event.message);
          progress.update(event.iter, event.loss);
        } else {
          print(event.message);
        }
      },
    });
    progress?.finish();
    if (result.stopped) {
      console.log(`stopped at iteration ${result.iter_num}; resume with --init_from=resume --out_dir=${result.out_dir}`);
      process.exitCode = 130;
    }
  } finally {
    process.off('SIGINT', onSigint);
  }
}
