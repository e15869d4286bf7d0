// `nanogpt-rs train`: runs `train` and prints what it reports (a progress bar on a terminal). Ctrl-C asks the run
// to stop and save (see `train`'s signal); a second Ctrl-C quits, once a save under way has finished. The ranks of a data-parallel run get
// the request as SIGUSR2, which their launcher sends mpirun on Ctrl-C and mpirun forwards to each of them.
import { trainSchema, type TrainConfig } from './config.ts';
import { hasCheckpoint, readCheckpointInfo } from './checkpoint.ts';
import { cliCommand, firstLine, shellWord } from './errors.ts';
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
    if (!announced) print('interrupted: stopping and saving a checkpoint (Ctrl-C again to quit now)');
    announced = true;
  };
  // On one process a second Ctrl-C exits. Both can arrive during one call into the engine, which holds the event
  // loop: they are then handled one after the other when it returns, so the listener that exits must be in place
  // before the first one's is removed (a signal with no listener left would be dropped). A save under way finishes
  // first. A rank's SIGINT comes from mpirun, after the stop request: its default action (exit) ends the rank.
  const quit = () => process.exit(130);
  const requestStop = () => {
    if (worldSize === 1) process.on('SIGINT', quit);
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
      if (rank === 0) console.log(stoppedLine(result.iter_num, result.out_dir, worldSize));
      // A rank exits 0: on any other code mpirun ends the job at once, and MPI is finalised on 0 only (see
      // Engine.joinDataParallel); the launcher, which asked for the stop, exits 130.
      process.exitCode = worldSize > 1 ? 0 : 130;
    }
  } finally {
    process.off('SIGINT', requestStop);
    process.off('SIGINT', quit);
  }
}

/** Where the run stopped, and how to resume from what out_dir holds (a stopped run may keep an earlier save). */
function stoppedLine(iter: number, outDir: string, worldSize: number): string {
  const stopped = `stopped at iteration ${iter}`;
  if (!hasCheckpoint(outDir)) return `${stopped}; nothing is saved in ${outDir}`;
  let resumesAt: number;
  try {
    resumesAt = readCheckpointInfo(outDir).iter_num;
  } catch (err) {
    return `${stopped}; ${firstLine(err)}`;
  }
  const saved = `${stopped}; the checkpoint in ${outDir} resumes at iteration ${resumesAt}`;
  // A rank does not have its launcher's flags (--nproc_per_node): it names the change instead of the command.
  if (worldSize > 1) return `${saved}: run the same command with --init_from=resume`;
  const args = process.argv.slice(3).filter((arg) => !arg.startsWith('--init_from='));
  return `${saved}: ${cliCommand} train ${[...args, '--init_from=resume'].map(shellWord).join(' ')}`;
}
