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
