// Where this process stands in a data-parallel run (see distributed.ts), as its launcher told it.
import { UserError } from './errors.ts';

export interface Ranks {
  rank: number;
  worldSize: number;
}

/** A rank's whole place in the run: on which machine's which device it trains, and where it meets the others. */
export interface Placement extends Ranks {
  /** This rank among those on its machine; a GPU rank trains on cuda:localRank. */
  localRank: number;
  localWorldSize: number;
  /** Where rank 0 listens for the others (torchrun's MASTER_ADDR:MASTER_PORT); absent under mpirun, which joins its ranks itself. */
  master?: { addr: string; port: number };
}

// Each launcher's names for the same four numbers; mpirun's come first, so that torchrun-style variables left in the
// environment of an mpirun job do not count.
const launchers = [
  { rank: 'OMPI_COMM_WORLD_RANK', size: 'OMPI_COMM_WORLD_SIZE', localRank: 'OMPI_COMM_WORLD_LOCAL_RANK', localSize: 'OMPI_COMM_WORLD_LOCAL_SIZE', start: 'mpirun -np N' },
  { rank: 'RANK', size: 'WORLD_SIZE', localRank: 'LOCAL_RANK', localSize: 'LOCAL_WORLD_SIZE', start: 'torchrun or --nproc_per_node=N' },
] as const;

/**
 * This process's place in the run, from its launcher's environment: OpenMPI's mpirun, else torchrun's RANK,
 * LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; alone when neither set it. Without the local
 * numbers, every rank is taken to be on this machine.
 */
export function launchPlacement(env: NodeJS.ProcessEnv = process.env): Placement {
  for (const names of launchers) {
    if (env[names.size] === undefined) continue;
    const rank = Number(env[names.rank]);
    const worldSize = Number(env[names.size]);
    if (!Number.isInteger(worldSize) || worldSize < 1 || !Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
      throw new UserError(`${names.rank}=${env[names.rank]} and ${names.size}=${env[names.size]} do not name a rank of the run; start the processes with ${names.start}`);
    }
    const localRank = env[names.localRank] === undefined ? rank : Number(env[names.localRank]);
    const localWorldSize = env[names.localSize] === undefined ? worldSize : Number(env[names.localSize]);
    if (
      !Number.isInteger(localWorldSize) || localWorldSize < 1 || localWorldSize > worldSize ||
      !Number.isInteger(localRank) || localRank < 0 || localRank >= localWorldSize
    ) {
      throw new UserError(
        `${names.localRank}=${env[names.localRank]} and ${names.localSize}=${env[names.localSize]} do not name a rank on this machine of a run of ${worldSize}; start the processes with ${names.start}`,
      );
    }
    const placement: Placement = { rank, worldSize, localRank, localWorldSize };
    if (names.rank === 'RANK' && (env.MASTER_ADDR !== undefined || env.MASTER_PORT !== undefined)) placement.master = masterOf(env);
    return placement;
  }
  return { rank: 0, worldSize: 1, localRank: 0, localWorldSize: 1 };
}

function masterOf(env: NodeJS.ProcessEnv): { addr: string; port: number } {
  const port = Number(env.MASTER_PORT);
  if (!env.MASTER_ADDR || env.MASTER_PORT === undefined || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new UserError(
      `MASTER_ADDR=${env.MASTER_ADDR ?? ''} and MASTER_PORT=${env.MASTER_PORT ?? ''} do not name where rank 0 listens; set both (a host and a port from 1 to 65535), as torchrun does`,
    );
  }
  return { addr: env.MASTER_ADDR, port };
}

/** This process's place in the run, from its launcher's environment: OpenMPI's mpirun, else torchrun-style RANK/WORLD_SIZE. */
export function launchRanks(env: NodeJS.ProcessEnv = process.env): Ranks {
  const { rank, worldSize } = launchPlacement(env);
  return { rank, worldSize };
}

/** How many ranks of the run share this machine: mpirun's and torchrun's count, else all of them. */
export function localWorldSize(env: NodeJS.ProcessEnv = process.env): number {
  return launchPlacement(env).localWorldSize;
}
