// Data-parallel training over MPI (ts/distributed.ts): nanoGPT's DDP rules, checked on two ranks of a tiny model.
// The runs need OpenMPI's mpirun and the engine built with MPI (`npm run build:native:mpi`); without either they
// are reported skipped. The parsing of the launcher's arguments and of mpirun's reports runs everywhere.
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { trainSchema, resolveConfig } from '../ts/config.ts';
import { BatchLoader } from '../ts/data.ts';
import { checkDataParallel, failedRank } from '../ts/distributed.ts';
import { Engine, mpiBuilt } from '../ts/engine.ts';
import { launchRanks } from '../ts/ranks.ts';
import { Rng } from '../ts/rng.ts';
import type { TrainRecord } from '../ts/telemetry.ts';
import { readTensors } from './safetensors.ts';

const cli = fileURLToPath(new URL('../bin/nanogpt-rs.js', import.meta.url));
const corpus = fileURLToPath(new URL('../data/shakespeare_char/input.txt', import.meta.url));
const hasMpirun = !spawnSync('mpirun', ['--version'], { stdio: 'ignore' }).error;
const canRun = hasMpirun && mpiBuilt();

describe('launching ranks', () => {
  it('reads the rank from mpirun, else torchrun, else runs alone', () => {
    expect(launchRanks({ OMPI_COMM_WORLD_RANK: '1', OMPI_COMM_WORLD_SIZE: '2', RANK: '0', WORLD_SIZE: '4' })).toEqual({ rank: 1, worldSize: 2 });
    expect(launchRanks({ RANK: '3', WORLD_SIZE: '4' })).toEqual({ rank: 3, worldSize: 4 });
    expect(launchRanks({})).toEqual({ rank: 0, worldSize: 1 });
    expect(() => launchRanks({ RANK: '4', WORLD_SIZE: '4' })).toThrow(/RANK=4 and WORLD_SIZE=4 do not name a rank/);
  });

  it("applies nanoGPT's rules before any process starts", () => {
    const config = (overrides: Record<string, unknown>) => resolveConfig(trainSchema, { device: 'cpu', engine: 'native', ...overrides });
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 5 }), 2)).toThrow(
      'gradient_accumulation_steps=5 must be divisible by the 2 processes, which share them out; use a multiple of 2',
    );
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, engine: 'wasm' }), 2)).toThrow(/--engine=native$/);
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, engine: 'auto' }), 2)).toThrow(/--engine=native$/);
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, device: 'cuda' }), 2)).toThrow(/no NCCL/);
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4 }), 2)).not.toThrow();
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 5, engine: 'wasm' }), 1)).not.toThrow();
  });

  it("names the rank that ended the job from mpirun's report", () => {
    const killed = `--------------------------------------------------------------------------
mpirun noticed that process rank 1 with PID 4242 on node host exited on signal 9 (Killed).
--------------------------------------------------------------------------`;
    expect(failedRank(killed)).toBe('rank 1 (pid 4242) was killed by signal 9 (Killed)');
    expect(failedRank(killed.replace('PID 4242', 'PID 0'))).toBe('rank 1 was killed by signal 9 (Killed)');
    const exited = `mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[51234,1],1]
  Exit code:    1`;
    expect(failedRank(exited)).toBe('rank 1 exited with code 1 (its error is above)');
    expect(failedRank('some other failure')).toBeUndefined();
  });
});

describe.skipIf(!canRun)('data-parallel training on two ranks (mpirun)', () => {
  const work = mkdtempSync(join(tmpdir(), 'nanogpt-ddp-'));
  afterAll(() => rmSync(work, { recursive: true, force: true }));
  const model = { n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, bias: false, dropout: 0 };
  const tiny = [
    '--dataset=shakespeare_char',
    '--device=cpu',
    '--engine=native',
    ...Object.entries(model).map(([key, value]) => `--${key}=${value === false ? 'False' : value}`),
    '--batch_size=4',
    '--learning_rate=3e-3',
    '--decay_lr=False',
    '--eval_iters=1',
    '--log_interval=1',
  ];

  const run = (...args: string[]) => {
    const result = spawnSync(process.execPath, [cli, ...args], { cwd: work, encoding: 'utf8' });
    return { status: result.status, stdout: result.stdout, stderr: result.stderr };
  };

  beforeAll(() => {
    mkdirSync(join(work, 'data', 'shakespeare_char'), { recursive: true });
    copyFileSync(corpus, join(work, 'data', 'shakespeare_char', 'input.txt'));
    expect(run('prepare', 'shakespeare_char').status).toBe(0);
  });

  it('gives the losses and weights of one process accumulating both ranks’ batches', () => {
    const iters = 6;
    const accumulation = 4;
    const trained = run(
      'train',
      ...tiny,
      '--nproc_per_node=2',
      `--gradient_accumulation_steps=${accumulation}`,
      `--max_iters=${iters}`,
      `--eval_interval=${iters}`,
      '--always_save_checkpoint=True',
      '--out_dir=out-ddp',
    );
    expect(trained.stderr).toBe('');
    expect(trained.status).toBe(0);
    expect(trained.stdout).toContain('data parallel: 2 processes, 2 gradient accumulation steps each');
    expect(trained.stdout).toContain(`tokens per iteration will be: ${accumulation * 4 * 32}`);
    const log = readFileSync(join(work, 'out-ddp', 'log.jsonl'), 'utf8')
      .trim()
      .split('\n')
      .map((line) => JSON.parse(line) as TrainRecord)
      .filter((record) => record.kind === 'train');

    // One process, accumulating 2 x 2 micro-batches per step: rank r's batches come from the stream seeded
    // 1337 + r, and rank 0's stream also gives the evaluation's batches at iteration 0, before the first step.
    const config = resolveConfig(trainSchema, { device: 'cpu' });
    const streams = [0, 1].map((rank) => new BatchLoader(join(work, 'data', 'shakespeare_char'), 4, 32, new Rng(config.seed + rank)));
    const next = streams.map((stream) => stream.next('train'));
    streams[0].next('train');
    streams[0].next('val');
    const engine = Engine.create({ ...model, vocab_size: 65 }, config.seed, 'cpu', 'native');
    engine.configureOptimizer({ weight_decay: config.weight_decay, beta1: config.beta1, beta2: config.beta2, grad_clip: config.grad_clip });
    const losses: number[] = [];
    for (let iter = 0; iter < iters; iter++) {
      let rank0Loss = 0;
      for (const rank of [0, 1]) {
        for (let micro = 0; micro < accumulation / 2; micro++) {
          const loss = engine.forwardBackward(next[rank].x, next[rank].y, 4, 1 / accumulation);
          if (rank === 0) rank0Loss = loss;
          next[rank] = streams[rank].next('train');
        }
      }
      losses.push(rank0Loss);
      engine.step(3e-3);
    }
    streams.forEach((stream) => stream.close());

    expect(log.slice(0, iters).map((record) => record.iter)).toEqual([0, 1, 2, 3, 4, 5]);
    for (let iter = 0; iter < iters; iter++) expect(Math.abs(log[iter].loss - losses[iter])).toBeLessThan(1e-5);
    // The loss moved: the ranks trained, rather than matching an untouched model.
    expect(Math.abs(losses[iters - 1] - losses[0])).toBeGreaterThan(0.05);

    const reference = join(work, 'reference.safetensors');
    engine.saveWeightsFile(reference);
    const expected = readTensors(reference);
    const saved = readTensors(join(work, 'out-ddp', 'model.safetensors'));
    expect([...saved.keys()].sort()).toEqual([...expected.keys()].sort());
    let largest = 0;
    for (const [name, { data }] of expected) {
      const got = saved.get(name)!.data;
      for (let i = 0; i < data.length; i++) largest = Math.max(largest, Math.abs(got[i] - data[i]));
    }
    expect(largest).toBeLessThan(1e-5);
  });

  it('prints, logs and saves on rank 0 only', () => {
    // Each rank reads the config module itself, so each gets an out_dir of its own: only rank 0's may appear.
    writeFileSync(join(work, 'per-rank.js'), "export default { out_dir: 'out-rank' + process.env.OMPI_COMM_WORLD_RANK };\n");
    const trained = run('train', 'per-rank.js', ...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=2', '--eval_interval=2');
    expect(trained.stderr).toBe('');
    expect(trained.status).toBe(0);
    expect(readdirSync(join(work, 'out-rank0')).sort()).toEqual(['ckpt.json', 'log.jsonl', 'model.safetensors', 'optimizer.safetensors']);
    expect(existsSync(join(work, 'out-rank1'))).toBe(false);
    expect(trained.stdout.match(/^iter 1: /gm)).toHaveLength(1);
    expect(trained.stdout.match(/^step 2: /gm)).toHaveLength(1);
    expect(trained.stdout.match(/^tokens per iteration will be/gm)).toHaveLength(1);

    // Resuming on one process: the global batch is the same, the ranks' share of it all on one.
    const resumed = run('train', ...tiny, '--init_from=resume', '--out_dir=out-rank0', '--gradient_accumulation_steps=2', '--max_iters=3', '--eval_interval=2');
    expect(resumed.stderr).toBe('');
    expect(resumed.status).toBe(0);
    expect(resumed.stdout).toContain('iter 2: ');
  });

  it('runs under mpirun started by hand', () => {
    const rootAllowed = { OMPI_ALLOW_RUN_AS_ROOT: '1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM: '1' };
    const args = ['-np', '2', '--oversubscribe', process.execPath, cli, 'train', ...tiny, '--gradient_accumulation_steps=2', '--max_iters=2', '--out_dir=out-mpirun'];
    const result = spawnSync('mpirun', args, { cwd: work, encoding: 'utf8', env: { ...process.env, ...rootAllowed } });
    expect(result.stderr).toBe('');
    expect(result.status).toBe(0);
    expect(result.stdout).toContain('data parallel: 2 processes, 1 gradient accumulation steps each');
    expect(result.stdout.match(/^iter 2: /gm)).toHaveLength(1);
  });

  it('ends the job when a rank dies, naming the rank', async () => {
    const marker = `nanogpt-ddp-kill-${process.pid}`;
    const child = spawn(process.execPath, [cli, 'train', ...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=100000', '--eval_interval=100000', '--out_dir=out-kill'], {
      cwd: work,
      env: { ...process.env, NANOGPT_TEST_JOB: marker },
    });
    let stdout = '';
    let stderr = '';
    let killed: number | undefined;
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      if (killed === undefined && /^iter 3: /m.test(stdout)) {
        killed = rankProcess(marker, 1);
        process.kill(killed, 'SIGKILL');
      }
    });
    const status = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(killed).toBeDefined();
    expect(status).not.toBe(0);
    const last = stderr.trim().split('\n').at(-1);
    expect(last).toMatch(new RegExp(`^error: rank 1 (\\(pid ${killed}\\) )?was killed by signal 9 \\(Killed\\); the job was stopped$`));
  });
});

/** The pid of rank `rank` among the processes whose environment holds NANOGPT_TEST_JOB=`marker`. */
function rankProcess(marker: string, rank: number): number {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let environ: string[];
    try {
      environ = readFileSync(join('/proc', entry, 'environ'), 'latin1').split('\0');
    } catch {
      continue;
    }
    if (environ.includes(`NANOGPT_TEST_JOB=${marker}`) && environ.includes(`OMPI_COMM_WORLD_RANK=${rank}`)) return Number(entry);
  }
  throw new Error(`no process of rank ${rank} found`);
}
