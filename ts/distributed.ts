// Data-parallel training across processes, as nanoGPT does it under torchrun (DDP): every process (rank) holds the
// whole model and trains on its own batches; the engine averages the gradients over the ranks before each step.
// The processes come from mpirun: `nanogpt-rs train --nproc_per_node=N` starts it (`launch` below), or the user
// runs `mpirun -np N npx nanogpt-rs train ...` directly.
import { spawn, spawnSync } from 'node:child_process';
import type { TrainConfig } from './config.ts';
import { mpiBuildMissing, mpiBuilt, ncclBuildMissing, ncclBuilt, resolveEngine, type EngineChoice } from './engine.ts';
import { UserError } from './errors.ts';

/**
 * nanoGPT's rules for a run of `worldSize` ranks that can be checked before any process starts: the gradient
 * accumulation steps are shared out among the ranks, and gradients are exchanged by the native CPU engine (MPI) or
 * the CUDA engine built with NCCL.
 */
export function checkDataParallel(config: TrainConfig, worldSize: number): void {
  if (!(config.ddp_timeout > 0)) {
    throw new UserError(`ddp_timeout must be a positive number of seconds, got ${config.ddp_timeout}; use e.g. --ddp_timeout=600`);
  }
  if (config.zero_stage !== 0 && config.zero_stage !== 1) {
    throw new UserError(`zero_stage must be 0 (off) or 1 (AdamW state sharded over the ranks), got ${config.zero_stage}; use --zero_stage=1 or --zero_stage=0`);
  }
  if (worldSize === 1) return;
  if (config.gradient_accumulation_steps % worldSize !== 0) {
    throw new UserError(
      `gradient_accumulation_steps=${config.gradient_accumulation_steps} must be divisible by the ${worldSize} processes, which share them out; use a multiple of ${worldSize}`,
    );
  }
  if (config.device.startsWith('cuda')) {
    if (!ncclBuilt()) throw new UserError(ncclBuildMissing);
    return;
  }
  if (config.device !== 'cpu') {
    throw new UserError(`data-parallel training runs on cpu (MPI) or cuda (NCCL), not on ${config.device}; use --device=cpu or --device=cuda`);
  }
  if (resolveEngine(config.device, config.engine as EngineChoice) === 'wasm') {
    throw new UserError(`the WebAssembly engine has no collectives for data-parallel training across ${worldSize} processes; use --engine=native`);
  }
}

/**
 * Runs `train <args>` on `nproc` processes under mpirun and waits for it. mpirun ends the whole job when any rank
 * exits abnormally; its report of which rank and why is turned into one line, and the exit code is passed on.
 * Ctrl-C asks the ranks to stop after the current step, rank 0 saving a checkpoint of it; a second one ends the job
 * at once.
 */
export async function launch(nproc: number, args: string[]): Promise<number> {
  if (spawnSync('mpirun', ['--version'], { stdio: 'ignore' }).error) {
    throw new UserError('--nproc_per_node needs OpenMPI\'s mpirun, which is not on PATH; install it (apt-get install -y openmpi-bin libopenmpi-dev) or drop --nproc_per_node');
  }
  if (!mpiBuilt()) throw new UserError(mpiBuildMissing);
  const env = { ...process.env };
  // OpenMPI refuses to run as root unless told twice (containers and CI run as root).
  if (process.getuid?.() === 0) Object.assign(env, { OMPI_ALLOW_RUN_AS_ROOT: '1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM: '1' });
  const command = [process.execPath, ...process.execArgv, process.argv[1], 'train', ...args];
  // mpirun runs in a session of its own, so that Ctrl-C (SIGINT to the terminal's foreground process group) reaches
  // this process alone, which tells the ranks through mpirun: it forwards SIGUSR2 to every rank (OpenMPI's default),
  // and each rank then stops after the step they all agree on (see train.ts), rank 0 saving a checkpoint and printing
  // how to resume. A second Ctrl-C is passed on as SIGINT, on which mpirun ends the job at once.
  const mpirun = spawn('mpirun', ['-np', String(nproc), '--oversubscribe', ...command], { env, stdio: ['inherit', 'inherit', 'pipe'], detached: true });
  let interrupts = 0;
  const interrupt = () => mpirun.kill(++interrupts === 1 ? 'SIGUSR2' : 'SIGINT');
  // Outside the terminal's process group, mpirun would outlive this process: the signals that end it end the job.
  const forward = (signal: NodeJS.Signals) => mpirun.kill(signal);
  // Nor would Ctrl-Z reach it: it pauses the ranks (mpirun forwards SIGTSTP and SIGCONT), then this process.
  const pause = () => {
    mpirun.kill('SIGTSTP');
    process.kill(process.pid, 'SIGSTOP');
  };
  const resume = () => mpirun.kill('SIGCONT');
  process.on('SIGINT', interrupt);
  process.on('SIGTERM', forward);
  process.on('SIGHUP', forward);
  process.on('SIGTSTP', pause);
  process.on('SIGCONT', resume);
  // mpirun's report comes last: the tail of its output is enough.
  let stderr = '';
  mpirun.stderr.on('data', (chunk: Buffer) => {
    // mpirun announces each signal it forwards; the ranks say what the stop does.
    const text = chunk.toString().replace(/^mpirun: Forwarding signal \d+ to job\n/gm, '');
    process.stderr.write(text);
    stderr = (stderr + text).slice(-65536);
  });
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => mpirun.on('close', (c, s) => resolve([c, s])));
  process.off('SIGINT', interrupt);
  process.off('SIGTERM', forward);
  process.off('SIGHUP', forward);
  process.off('SIGTSTP', pause);
  process.off('SIGCONT', resume);
  // The ranks stopped together, with a checkpoint (they exit 0 so that mpirun lets rank 0 finish saving).
  if (code === 0) return interrupts > 0 ? 130 : 0;
  if (interrupts > 0) {
    console.error('interrupted: mpirun stopped the ranks; the last checkpoint saved is in out_dir (resume with --init_from=resume)');
    return 130;
  }
  console.error(`error: ${failedRank(stderr) ?? `mpirun ended with ${signal ?? `exit code ${code}`}`}; the job was stopped`);
  return code || 1;
}

/** Which rank ended the job and how, from mpirun's report (OpenMPI 4.1's wording); undefined if it gave none. */
export function failedRank(mpirunStderr: string): string | undefined {
  const text = mpirunStderr.replace(/\s+/g, ' ');
  const signalled = /noticed that process rank (\d+) with PID (\d+) on node \S+ exited on signal (\d+)(?: \(([^)]+)\))?/.exec(text);
  if (signalled) {
    const [, rank, pid, signal, name] = signalled;
    // OpenMPI 4.1 reports pid 0 for a process it did not see exit.
    return `rank ${rank}${pid === '0' ? '' : ` (pid ${pid})`} was killed by signal ${signal}${name ? ` (${name})` : ''}`;
  }
  const exited = /Process name: \[\[\d+,\d+\],(\d+)\] Exit code: (\d+)/.exec(text);
  if (exited) return `rank ${exited[1]} exited with code ${exited[2]} (its error is above)`;
  return undefined;
}
