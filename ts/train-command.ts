// `nanogpt-rs train`: runs `train` and prints what it reports (a progress bar on a terminal). Ctrl-C asks the run
// to stop after the current step, with a checkpoint of it; a second Ctrl-C exits at once. The ranks of a data-parallel
// run get the request as SIGUSR2, which their launcher sends mpirun on Ctrl-C and mpirun forwards to each of them.
import { trainSchema, type TrainConfig } from './config.ts';
import { Progress } from './progress.ts';
import { launchRanks } from './ranks.ts';
import { train } from './train.ts';

export async function runTrainCommand(overrides: Partial<TrainConfig>): Promise<void> {
  const { rank, worldSize } = launchRanks();
  // mpirun gives its ranks a pseudo-terminal whatever its own output is, so a run of several processes prints
  // nanoGPT's plain lines rather than a progress bar.
  const output = worldSize > 1 ? { write: process.stdout.write.bind(process.stdout), isTTY: false } : process.stdout;
  const stop = new AbortController();
  let progress: Progress | undefined;
  // Rank 0 speaks for the run.
  const print = (line: string) => {
    if (rank !== 0) return;
    if (progress) progress.print(line);
    else console.log(line);
  };
  let announced = false;
  const announceStop = () => {
    if (!announced) print('interrupted: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)');
    announced = true;
  };
  // Only the first Ctrl-C is caught: once its listener is gone, SIGINT's default action (exit) is back, so a second
  // one ends the process at once, even in the middle of a step or of the checkpoint save.
  const requestStop = () => {
    process.off('SIGINT', requestStop);
    stop.abort();
    announceStop();
  };
  process.on('SIGINT', requestStop);
  // A rank's SIGUSR2 stays caught until the process exits: mpirun forwards the request to one rank after another, and
  // the ranks stop as soon as one of them has it (see train.ts), so it can reach a rank that has already stopped,
  // where SIGUSR2's default action would end the rank and mpirun report it as failed.
  if (worldSize > 1) process.on('SIGUSR2', requestStop);
  try {
    const result = await train(overrides, {
      signal: stop.signal,
      onLog: (event) => {
        if (event.kind === 'iter') {
          progress ??= new Progress(output, overrides.max_iters ?? trainSchema.max_iters.default);
          progress.log(event.message);
          progress.update(event.iter, event.loss);
        } else if (event.kind === 'stop') {
          // Rank 0 can learn of the stop from another rank before its own signal handler runs (mpirun forwards the
          // request to one rank after another), or never be asked at all (a rank signalled by hand).
          announceStop();
        } else {
          print(event.message);
        }
      },
    });
    progress?.finish();
    if (result.stopped) {
      if (rank === 0) console.log(`stopped at iteration ${result.iter_num}; resume with --init_from=resume --out_dir=${result.out_dir}`);
      // A rank exits 0: on any other code mpirun ends the job at once, and MPI is finalised on 0 only (see
      // Engine.joinDataParallel); the launcher, which asked for the stop, exits 130.
      process.exitCode = worldSize > 1 ? 0 : 130;
    }
  } finally {
    process.off('SIGINT', requestStop);
  }
}
