// torchrun's flags and environment (ts/launch-ranks.ts, ts/ranks.ts), and the launcher that starts and watches the
// ranks, run on stand-in ranks (test/fixtures/launch/rank.mjs) so that no GPU is needed.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { resolveConfig, trainSchema } from '../ts/config.ts';
import { ncclBuilt } from '../ts/engine.ts';
import { launchTraining, rankEnvironment, takeLaunchFlags } from '../ts/launch-ranks.ts';
import { launchPlacement, localWorldSize } from '../ts/ranks.ts';

const fixtures = join(import.meta.dirname, 'fixtures', 'launch');

describe("torchrun's flags", () => {
  it("takes them out of the arguments, in each spelling, with torchrun's defaults", () => {
    expect(takeLaunchFlags(['cfg.ts', '--nproc_per_node=2', '--device=cpu'])).toEqual({
      flags: { nprocPerNode: 2, nnodes: 1, nodeRank: 0, masterAddr: '127.0.0.1', masterPort: 29500, worldSize: 2 },
      rest: ['cfg.ts', '--device=cpu'],
    });
    const multiNode = ['--nproc-per-node', '8', '--nnodes=2', '--node_rank', '1', '--master_addr=gpu0', '--master-port=1234', '--max_iters=5'];
    expect(takeLaunchFlags(multiNode)).toEqual({
      flags: { nprocPerNode: 8, nnodes: 2, nodeRank: 1, masterAddr: 'gpu0', masterPort: 1234, worldSize: 16 },
      rest: ['--max_iters=5'],
    });
    expect(takeLaunchFlags(['--max_iters=5'])).toEqual({ flags: undefined, rest: ['--max_iters=5'] });
  });

  it('refuses bad values with the fix', () => {
    const refusal = (...args: string[]) => () => takeLaunchFlags(args);
    expect(refusal('--nproc_per_node=two')).toThrow("--nproc_per_node must be a positive integer, got 'two'");
    expect(refusal('--nproc_per_node=0')).toThrow("--nproc_per_node must be a positive integer, got '0'");
    expect(refusal('--nproc_per_node')).toThrow("--nproc_per_node must be a positive integer, got ''");
    expect(refusal('--nnodes=1:2')).toThrow(/^--nnodes must be a positive integer \(.*elastic MIN:MAX ranges are not supported\), got '1:2'$/);
    expect(refusal('--nnodes=2', '--node_rank=2', '--master_addr=gpu0')).toThrow(
      '--node_rank=2 is out of range for --nnodes=2; number the machines 0 to 1, 0 for the one rank 0 runs on',
    );
    expect(refusal('--node_rank=1')).toThrow(/--node_rank=1 is out of range for --nnodes=1/);
    expect(refusal('--node_rank=-1')).toThrow("--node_rank must be a non-negative integer, got '-1'");
    expect(refusal('--master_port=65536')).toThrow("--master_port must be a port number from 1 to 65535, got '65536'");
    expect(refusal('--master_port=http')).toThrow("--master_port must be a port number from 1 to 65535, got 'http'");
    expect(refusal('--nnodes=2', '--nproc_per_node=8')).toThrow(
      '--nnodes=2 needs --master_addr=HOST, the address of the --node_rank=0 machine, where rank 0 listens; the same on every machine',
    );
    expect(refusal('--master_addr=', '--nproc_per_node=2')).toThrow("--master_addr must name the host of the --node_rank=0 machine, got ''");
  });

  it("gives each rank torchrun's environment", () => {
    const { flags } = takeLaunchFlags(['--nproc_per_node=4', '--nnodes=3', '--node_rank=2', '--master_addr=gpu0']);
    expect(rankEnvironment(flags!, 1)).toEqual({ RANK: '9', LOCAL_RANK: '1', WORLD_SIZE: '12', LOCAL_WORLD_SIZE: '4', MASTER_ADDR: 'gpu0', MASTER_PORT: '29500' });
  });

  it('leaves CPU ranks across machines to mpirun --hostfile', async () => {
    const config = (device: string) => resolveConfig(trainSchema, { device, engine: 'native', gradient_accumulation_steps: 8 });
    const { flags } = takeLaunchFlags(['--nproc_per_node=2', '--nnodes=2', '--master_addr=host0']);
    await expect(launchTraining(flags!, [], config('cpu'))).rejects.toThrow(
      'CPU ranks across machines run under mpirun --hostfile (mpirun --hostfile HOSTS -np N npx nanogpt-rs train ...); --nnodes is for GPU ranks',
    );
  });

  it.skipIf(ncclBuilt())('refuses GPU ranks where the CUDA engine with NCCL is not built', async () => {
    const config = resolveConfig(trainSchema, { device: 'cuda', engine: 'native', gradient_accumulation_steps: 8 });
    const { flags } = takeLaunchFlags(['--nproc_per_node=2', '--nnodes=2', '--master_addr=host0']);
    await expect(launchTraining(flags!, [], config)).rejects.toThrow(/run `npm run build:cuda:nccl`$/);
  });
});

describe("a rank's place, from its launcher's environment", () => {
  it('reads all of what torchrun sets', () => {
    const torchrun = { RANK: '9', LOCAL_RANK: '1', WORLD_SIZE: '12', LOCAL_WORLD_SIZE: '4', MASTER_ADDR: 'gpu0', MASTER_PORT: '29500' };
    expect(launchPlacement(torchrun)).toEqual({ rank: 9, worldSize: 12, localRank: 1, localWorldSize: 4, master: { addr: 'gpu0', port: 29500 } });
    expect(localWorldSize(torchrun)).toBe(4);
    // Without the local numbers, the ranks are all on this machine.
    expect(launchPlacement({ RANK: '3', WORLD_SIZE: '4' })).toEqual({ rank: 3, worldSize: 4, localRank: 3, localWorldSize: 4 });
    expect(launchPlacement({})).toEqual({ rank: 0, worldSize: 1, localRank: 0, localWorldSize: 1 });
  });

  it("takes mpirun's variables first", () => {
    const mpirun = { OMPI_COMM_WORLD_RANK: '3', OMPI_COMM_WORLD_SIZE: '4', OMPI_COMM_WORLD_LOCAL_RANK: '1', OMPI_COMM_WORLD_LOCAL_SIZE: '2' };
    expect(launchPlacement({ ...mpirun, RANK: '0', WORLD_SIZE: '8', LOCAL_RANK: '0', LOCAL_WORLD_SIZE: '8', MASTER_ADDR: 'gpu0', MASTER_PORT: '29500' })).toEqual({
      rank: 3,
      worldSize: 4,
      localRank: 1,
      localWorldSize: 2,
    });
  });

  it('refuses an environment that names no rank, with the fix', () => {
    const base = { RANK: '5', WORLD_SIZE: '8', LOCAL_RANK: '1', LOCAL_WORLD_SIZE: '4' };
    expect(() => launchPlacement({ ...base, LOCAL_RANK: '4' })).toThrow(
      'LOCAL_RANK=4 and LOCAL_WORLD_SIZE=4 do not name a rank on this machine of a run of 8; start the processes with torchrun or --nproc_per_node=N',
    );
    expect(() => launchPlacement({ ...base, LOCAL_WORLD_SIZE: '16' })).toThrow(/LOCAL_WORLD_SIZE=16 do not name a rank on this machine/);
    expect(() => launchPlacement({ ...base, MASTER_ADDR: 'gpu0', MASTER_PORT: 'http' })).toThrow(
      'MASTER_ADDR=gpu0 and MASTER_PORT=http do not name where rank 0 listens; set both (a host and a port from 1 to 65535), as torchrun does',
    );
    expect(() => launchPlacement({ ...base, MASTER_ADDR: 'gpu0' })).toThrow(/MASTER_PORT= do not name where rank 0 listens/);
    expect(() => launchPlacement({ OMPI_COMM_WORLD_RANK: '0', OMPI_COMM_WORLD_SIZE: '2', OMPI_COMM_WORLD_LOCAL_RANK: '2', OMPI_COMM_WORLD_LOCAL_SIZE: '2' })).toThrow(
      /start the processes with mpirun -np N$/,
    );
  });
});

describe('the launcher, on stand-in ranks', () => {
  let dir: string;
  let launcherGroup: number;
  // A test that failed may leave the launcher or ranks behind, each leading a process group.
  afterEach(() => {
    const groups = [launcherGroup, ...ranksStarted().map((name) => JSON.parse(readFileSync(join(dir, name), 'utf8')).pid as number)];
    for (const group of groups) {
      try {
        process.kill(-group, 'SIGKILL');
      } catch {
        // Already gone, as it should be.
      }
    }
    rmSync(dir, { recursive: true, force: true });
  });

  interface Launched {
    code: number | null;
    stdout: string;
    stderr: string;
    /** When the launcher exited (Date.now(), the clock of the failing rank's DIR/failed-at). */
    exitedAt: number;
  }

  /** Starts the launcher on `rank.mjs MODE DIR FAILING` in a process group of its own, as a shell starts a job. */
  const startLauncher = (graceMs: number, flags: string[], mode: string, failing = -1) => {
    dir = mkdtempSync(join(tmpdir(), 'nanogpt-launch-'));
    const launcher = spawn(process.execPath, ['--import', 'tsx', join(fixtures, 'launcher.ts'), String(graceMs), ...flags, '--', process.execPath, join(fixtures, 'rank.mjs'), mode, dir, String(failing)], {
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    launcher.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    launcher.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    launcherGroup = launcher.pid!;
    const done = new Promise<Launched>((resolve) => launcher.on('close', (code) => resolve({ code, stdout, stderr, exitedAt: Date.now() })));
    return { pgid: launcher.pid!, done };
  };

  const ranksStarted = () => readdirSync(dir).filter((name) => /^rank-\d+\.json$/.test(name));
  const rankFile = (rank: number) => JSON.parse(readFileSync(join(dir, `rank-${rank}.json`), 'utf8')) as { pid: number; env: Record<string, string> };
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  /** Resolves once `count` ranks have written their file. */
  const allStarted = async (count: number) => {
    while (ranksStarted().length < count) await new Promise((resolve) => setTimeout(resolve, 20));
  };
  const failedAt = () => Number(readFileSync(join(dir, 'failed-at'), 'utf8'));

  it("gives each rank of a machine torchrun's environment and passes on rank 0's output and the others' errors", async () => {
    const { done } = startLauncher(5000, ['--nproc_per_node=3'], 'env');
    const result = await done;
    expect(result.code).toBe(0);
    expect(ranksStarted().sort()).toEqual(['rank-0.json', 'rank-1.json', 'rank-2.json']);
    for (const rank of [0, 1, 2]) {
      expect(rankFile(rank).env).toEqual({ RANK: String(rank), LOCAL_RANK: String(rank), WORLD_SIZE: '3', LOCAL_WORLD_SIZE: '3', MASTER_ADDR: '127.0.0.1', MASTER_PORT: '29500' });
    }
    expect(result.stdout.trim().split('\n')).toEqual(['stdout of rank 0']);
    expect(result.stderr.trim().split('\n').sort()).toEqual(['stderr of rank 0', 'stderr of rank 1', 'stderr of rank 2']);
  });

  it('starts the ranks of its own machine in a run of several', async () => {
    const { done } = startLauncher(5000, ['--nproc_per_node=2', '--nnodes=3', '--node_rank=1', '--master_addr=gpu0', '--master_port=29511'], 'env');
    expect((await done).code).toBe(0);
    expect(ranksStarted().sort()).toEqual(['rank-2.json', 'rank-3.json']);
    for (const [localRank, rank] of [2, 3].entries()) {
      expect(rankFile(rank).env).toEqual({ RANK: String(rank), LOCAL_RANK: String(localRank), WORLD_SIZE: '6', LOCAL_WORLD_SIZE: '2', MASTER_ADDR: 'gpu0', MASTER_PORT: '29511' });
    }
  });

  it('stops the others when a rank is killed, naming it in one line', async () => {
    const graceMs = 5000;
    const { done } = startLauncher(graceMs, ['--nproc_per_node=4'], 'kill', 3);
    const result = await done;
    expect(result.exitedAt - failedAt()).toBeLessThan(graceMs);
    const pids = [0, 1, 2, 3].map((rank) => rankFile(rank).pid);
    expect(pids.filter(alive)).toEqual([]);
    expect(result.stderr.trim().split('\n').at(-1)).toBe(`error: rank 3 (pid ${pids[3]}) was killed by signal 9 (SIGKILL); the job was stopped`);
    expect(result.code).toBe(137);
  });

  it('stops the others when a rank exits with an error', async () => {
    const graceMs = 5000;
    const { done } = startLauncher(graceMs, ['--nproc_per_node=3'], 'exit', 1);
    const result = await done;
    expect(result.exitedAt - failedAt()).toBeLessThan(graceMs);
    const pids = [0, 1, 2].map((rank) => rankFile(rank).pid);
    expect(pids.filter(alive)).toEqual([]);
    expect(result.stderr).toContain('rank 1 fails\n');
    expect(result.stderr.trim().split('\n').at(-1)).toBe(`error: rank 1 (pid ${pids[1]}) exited with code 1 (its error is above); the job was stopped`);
    expect(result.code).toBe(1);
  });

  it('kills a rank that ignores SIGTERM once the grace period is over', async () => {
    const graceMs = 1500;
    const { done } = startLauncher(graceMs, ['--nproc_per_node=3'], 'ignore-term', 0);
    const result = await done;
    // Both others were asked to stop, ignored it, and were killed no sooner than the grace period allows.
    expect(existsSync(join(dir, 'term-1')) && existsSync(join(dir, 'term-2'))).toBe(true);
    expect(result.exitedAt - failedAt()).toBeGreaterThanOrEqual(graceMs);
    expect([0, 1, 2].map((rank) => rankFile(rank).pid).filter(alive)).toEqual([]);
    expect(result.stderr.trim().split('\n').at(-1)).toMatch(/^error: rank 0 \(pid \d+\) exited with code 1 \(its error is above\); the job was stopped$/);
  });

  it('passes a Ctrl-C on to every rank once and waits for them to save', async () => {
    const { pgid, done } = startLauncher(5000, ['--nproc_per_node=3'], 'sigint');
    await allStarted(3);
    // A Ctrl-C at a terminal signals the whole foreground process group: the launcher's.
    process.kill(-pgid, 'SIGINT');
    const result = await done;
    expect(result.code).toBe(130);
    for (const rank of [0, 1, 2]) expect(readFileSync(join(dir, `saved-${rank}`), 'utf8')).toBe('1');
    expect([0, 1, 2].map((rank) => rankFile(rank).pid).filter(alive)).toEqual([]);
    expect(result.stderr).not.toMatch(/^error/m);
  });

  it('stops the ranks when it is asked to stop', async () => {
    const { pgid, done } = startLauncher(5000, ['--nproc_per_node=2'], 'sigint');
    await allStarted(2);
    process.kill(pgid, 'SIGTERM');
    const result = await done;
    expect(result.code).toBe(143);
    expect([0, 1].map((rank) => rankFile(rank).pid).filter(alive)).toEqual([]);
    expect(existsSync(join(dir, 'saved-0')) || existsSync(join(dir, 'saved-1'))).toBe(false);
  });
});
