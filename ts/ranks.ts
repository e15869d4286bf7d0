// Where this process stands in a data-parallel run (see distributed.ts), as its launcher told it.
import { UserError } from './errors.ts';

export interface Ranks {
  rank: number;
  worldSize: number;
}

/** This process's place in the run, from its launcher's environment: OpenMPI's mpirun, else torchrun-style RANK/WORLD_SIZE. */
export function launchRanks(env: NodeJS.ProcessEnv = process.env): Ranks {
  const pairs = [
    ['OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE'],
    ['RANK', 'WORLD_SIZE'],
  ] as const;
  for (const [rankKey, sizeKey] of pairs) {
    if (env[sizeKey] === undefined) continue;
    const rank = Number(env[rankKey]);
    const worldSize = Number(env[sizeKey]);
    if (!Number.isInteger(worldSize) || worldSize < 1 || !Number.isInteger(rank) || rank < 0 || rank >= worldSize) {
      throw new UserError(`${rankKey}=${env[rankKey]} and ${sizeKey}=${env[sizeKey]} do not name a rank of the run; start the processes with mpirun -np N`);
    }
    return { rank, worldSize };
  }
  return { rank: 0, worldSize: 1 };
}

/** How many ranks of the run share this machine: mpirun's and torchrun's count, else all of them. */
export function localWorldSize(env: NodeJS.ProcessEnv = process.env): number {
  const local = Number(env.OMPI_COMM_WORLD_LOCAL_SIZE ?? env.LOCAL_WORLD_SIZE);
  return Number.isInteger(local) && local >= 1 ? local : launchRanks(env).worldSize;
}
