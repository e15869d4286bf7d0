// Starting the ranks of a data-parallel run as torchrun does: its flags (--nproc_per_node, --nnodes, --node_rank,
// --master_addr, --master_port) and the environment it gives each rank (RANK, LOCAL_RANK, WORLD_SIZE,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; ranks.ts reads it). CPU ranks run under mpirun (distributed.ts's
// `launch`); GPU ranks, one process per GPU meeting at MASTER_ADDR:MASTER_PORT, are started and watched here, on each
// machine for its own GPUs.
import { spawn } from 'node:child_process';
import { constants } from 'node:os';
import type { TrainConfig } from './config.ts';
import { checkDataParallel, launch } from './distributed.ts';
import { UserError } from './errors.ts';
import { launchRanks } from './ranks.ts';

export interface LaunchFlags {
  nprocPerNode: number;
  nnodes: number;
  /** This machine's place among the nnodes, 0 for the one rank 0 runs on. */
  nodeRank: number;
  masterAddr: string;
  masterPort: number;
  /** nnodes x nprocPerNode: the ranks of the whole run. */
  worldSize: number;
}

const flagNames = ['nproc_per_node', 'nnodes', 'node_rank', 'master_addr', 'master_port'] as const;
type FlagName = (typeof flagNames)[number];

/**
 * torchrun's launcher flags taken out of `args`, each as `--name=value` or `--name value` (torchrun's dashed
 * spelling, `--nproc-per-node`, too), with torchrun's defaults for those absent; undefined when none is given.
 */
export function takeLaunchFlags(args: string[]): { flags: LaunchFlags | undefined; rest: string[] } {
  const given = new Map<FlagName, string>();
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const match = /^--([a-z_-]+)(?:=(.*))?$/s.exec(args[i]);
    const name = match?.[1].replaceAll('-', '_') as FlagName | undefined;
    if (match && name && flagNames.includes(name)) given.set(name, match[2] ?? args[++i] ?? '');
    else rest.push(args[i]);
  }
  if (given.size === 0) return { flags: undefined, rest };

  const count = (name: FlagName, fallback: number, least: number, most: number, rule: string) => {
    const text = given.get(name);
    if (text === undefined) return fallback;
    if (!/^\d+$/.test(text) || Number(text) < least || Number(text) > most) throw new UserError(`--${name} must be ${rule}, got '${text}'`);
    return Number(text);
  };
  const nprocPerNode = count('nproc_per_node', 1, 1, Infinity, 'a positive integer');
  const nnodes = count('nnodes', 1, 1, Infinity, 'a positive integer (the number of machines; elastic MIN:MAX ranges are not supported)');
  const nodeRank = count('node_rank', 0, 0, Infinity, 'a non-negative integer');
  if (nodeRank >= nnodes) {
    throw new UserError(`--node_rank=${nodeRank} is out of range for --nnodes=${nnodes}; number the machines 0 to ${nnodes - 1}, 0 for the one rank 0 runs on`);
  }
  const masterPort = count('master_port', 29500, 1, 65535, 'a port number from 1 to 65535');
  const masterAddr = given.get('master_addr');
  if (masterAddr === '') throw new UserError("--master_addr must name the host of the --node_rank=0 machine, got ''");
  if (nnodes > 1 && masterAddr === undefined) {
    throw new UserError(`--nnodes=${nnodes} needs --master_addr=HOST, the address of the --node_rank=0 machine, where rank 0 listens; the same on every machine`);
  }
  return {
    flags: { nprocPerNode, nnodes, nodeRank, masterAddr: masterAddr ?? '127.0.0.1', masterPort, worldSize: nnodes * nprocPerNode },
    rest,
  };
}

/** torchrun's environment for the rank `localRank` of this machine. */
export function rankEnvironment(flags: LaunchFlags, localRank: number): Record<string, string> {
  return {
    RANK: String(flags.nodeRank * flags.nprocPerNode + localRank),
    LOCAL_RANK: String(localRank),
    WORLD_SIZE: String(flags.worldSize),
    LOCAL_WORLD_SIZE: String(flags.nprocPerNode),
    MASTER_ADDR: flags.masterAddr,
    MASTER_PORT: String(flags.masterPort),
  };
}

/**
 * Runs `train <args>` (the launcher flags taken out) on the ranks `flags` asks for and waits for them: CPU ranks under
 * mpirun, GPU ranks started and watched here. Resolves with the exit code for the launcher.
 */
export async function launchTraining(flags: LaunchFlags, args: string[], config: TrainConfig): Promise<number> {
  if (launchRanks().worldSize > 1) {
    throw new UserError('--nproc_per_node and --nnodes start the ranks themselves; under mpirun or torchrun, leave them out');
  }
  if (config.device === 'cpu' && flags.nnodes > 1) {
    throw new UserError(
      'CPU ranks across machines run under mpirun --hostfile (mpirun --hostfile HOSTS -np N npx nanogpt-rs train ...); --nnodes is for GPU ranks',
    );
  }
  checkDataParallel(config, flags.worldSize);
  if (config.device === 'cpu') return launch(flags.nprocPerNode, args);
  return superviseRanks(flags, [process.execPath, ...process.execArgv, process.argv[1], 'train', ...args]);
}

/** How long a rank asked to stop (SIGTERM) has before it is killed (SIGKILL). */
export const stopGraceMs = 10_000;

/**
 * Starts this machine's `flags.nprocPerNode` ranks, each running `command` with torchrun's environment, and watches
 * them, as torchrun does. The first rank's output is passed on (rank 0's, on the first machine), and the others'
 * stderr (their errors). When a rank exits non-zero or is killed, the others are stopped (SIGTERM, then SIGKILL after
 * `graceMs`) and one line says which rank and how. Ctrl-C (SIGINT) is passed on to every rank, which stops after its
 * step with a checkpoint, and waited for. SIGTERM, or SIGHUP (the terminal closed), stops the ranks as a failure
 * does: in process groups of their own, they would outlive the launcher. Resolves with the exit code for the
 * launcher: 0, the failed rank's code (128 + the signal number for a killed rank), 130 after Ctrl-C, 128 + the signal
 * number after SIGTERM or SIGHUP.
 */
export async function superviseRanks(flags: LaunchFlags, command: readonly string[], graceMs = stopGraceMs): Promise<number> {
  // A rank started here must not take itself for a rank of an mpirun job this launcher runs in.
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('OMPI_COMM_WORLD_')));
  const ranks = Array.from({ length: flags.nprocPerNode }, (_, localRank) => {
    const env = { ...inherited, ...rankEnvironment(flags, localRank) };
    // Each rank leads a process group of its own, so that a Ctrl-C at the terminal reaches this launcher alone, which
    // passes it on once: a second SIGINT would make a rank quit at once rather than save a checkpoint.
    const child = spawn(command[0], command.slice(1), { env, detached: true, stdio: ['ignore', localRank === 0 ? 'inherit' : 'ignore', 'inherit'] });
    const ended = new Promise<RankEnd>((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
      child.once('error', (error) => resolve({ code: null, signal: null, error }));
    });
    return { rank: Number(env.RANK), pid: child.pid, ended };
  });

  const running = new Set(ranks);
  const signalAll = (signal: NodeJS.Signals) => {
    for (const { pid } of running) {
      try {
        if (pid !== undefined) process.kill(-pid, signal);
      } catch {
        // The rank's group is already gone.
      }
    }
  };
  let killTimer: NodeJS.Timeout | undefined;
  const stopAll = () => {
    if (killTimer) return;
    signalAll('SIGTERM');
    killTimer = setTimeout(() => signalAll('SIGKILL'), graceMs);
  };
  let interrupted = false;
  let stoppedBy: NodeJS.Signals | undefined;
  const onSigint = () => {
    interrupted = true;
    signalAll('SIGINT');
  };
  const onStop = (signal: NodeJS.Signals) => {
    stoppedBy = signal;
    stopAll();
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onStop);
  process.on('SIGHUP', onStop);

  let failure: { message: string; code: number } | undefined;
  try {
    await Promise.all(
      ranks.map(async (rank) => {
        const end = await rank.ended;
        running.delete(rank);
        // Once the job is being stopped, the ranks' ends are its doing.
        if (failure || stoppedBy || endedWell(end, interrupted)) return;
        failure = describeEnd(rank.rank, rank.pid, end);
        stopAll();
      }),
    );
  } finally {
    clearTimeout(killTimer);
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onStop);
    process.off('SIGHUP', onStop);
  }
  if (failure) {
    console.error(`error: ${failure.message}; the job was stopped`);
    return failure.code;
  }
  return stoppedBy ? 128 + constants.signals[stoppedBy] : interrupted ? 130 : 0;
}

interface RankEnd {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when the rank's process could not be started. */
  error?: Error;
}

/** A rank that finished, or that stopped as asked after a Ctrl-C (exit code 130, or SIGINT itself after a second one). */
function endedWell({ code, signal }: RankEnd, interrupted: boolean): boolean {
  return code === 0 || (interrupted && (code === 130 || signal === 'SIGINT'));
}

function describeEnd(rank: number, pid: number | undefined, { code, signal, error }: RankEnd): { message: string; code: number } {
  if (error) return { message: `rank ${rank} could not be started (${error.message})`, code: 1 };
  const who = `rank ${rank} (pid ${pid})`;
  if (signal) {
    const number = constants.signals[signal];
    return { message: `${who} was killed by signal ${number} (${signal})`, code: 128 + number };
  }
  return { message: `${who} exited with code ${code} (its error is above)`, code: code ?? 1 };
}
