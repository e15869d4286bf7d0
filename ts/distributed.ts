// Data-parallel training across processes, as nanoGPT does it under torchrun (DDP): every process (rank) holds the
// whole model and trains on its own batches; the engine averages the gradients over the ranks before each step.
// The processes come from mpirun: `nanogpt-rs train --nproc_per_node=N` starts it (`launch` below), or the user
// runs `mpirun -np N npx nanogpt-rs train ...` directly.
import { spawn, spawnSync } from 'node:child_process';
import type { TrainConfig } from './config.ts';
import { mpiBuildMissing, mpiBuilt, resolveEngine, type EngineChoice } from './engine.ts';
import { UserError } from './errors.ts';

/**
 * nanoGPT's rules for a run of `worldSize` ranks that can be checked before any process starts: the gradient
 * accumulation steps are shared out among the ranks, and only the native CPU engine exchanges gradients.
 */
export function checkDataParallel(config: TrainConfig, worldSize: number): void {
  if (worldSize === 1) return;
  if (config.gradient_accumulation_steps % worldSize !== 0) {
    throw new UserError(
      `gradient_accumulation_steps=${config.gradient_accumulation_steps} must be divisible by the ${worldSize} processes, which share them out; use a multiple of ${worldSize}`,
    );
  }
  if (config.device !== 'cpu') {
    throw new UserError(`data-parallel training runs on the cpu only so far (no NCCL); use --device=cpu --engine=native`);
  }
  if (resolveEngine(config.device, config.engine as EngineChoice) === 'wasm') {
    throw new UserError(`the WebAssembly engine has no collectives for data-parallel training across ${worldSize} processes; use --engine=native`);
  }
}

/**
 * Runs `train <args>` on `nproc` processes under mpirun and waits for it. mpirun ends the whole job when any rank
 * exits abnormally; its report of which rank and why is turned into one line, and the exit code is passed on.
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
  const mpirun = spawn('mpirun', ['-np', String(nproc), '--oversubscribe', ...command], { env, stdio: ['inherit', 'inherit', 'pipe'] });
  // Ctrl-C reaches mpirun too, which ends the job at once (the ranks, in process groups of their own, do not see it
  // and save nothing); this process waits to say so.
  let interrupted = false;
  const ignore = () => (interrupted = true);
  process.on('SIGINT', ignore);
  // mpirun's report comes last: the tail of its output is enough.
  let stderr = '';
  mpirun.stderr.on('data', (chunk: Buffer) => {
    process.stderr.write(chunk);
    stderr = (stderr + chunk.toString()).slice(-65536);
  });
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => mpirun.on('close', (c, s) => resolve([c, s])));
  process.off('SIGINT', ignore);
  if (code === 0) return 0;
  if (interrupted) {
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
