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
import { Engine, mpiBuilt, ncclBuilt } from '../ts/engine.ts';
import { launchRanks } from '../ts/ranks.ts';
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
    // GPU ranks need the CUDA engine built with NCCL (not built where there is no GPU).
    const gpuRanks = () => checkDataParallel(config({ gradient_accumulation_steps: 4, device: 'cuda' }), 2);
    if (ncclBuilt()) expect(gpuRanks).not.toThrow();
    else expect(gpuRanks).toThrow(/run `npm run build:cuda:nccl`$/);
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, device: 'mps' }), 2)).toThrow(/use --device=cpu or --device=cuda$/);
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4 }), 2)).not.toThrow();
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 5, engine: 'wasm' }), 1)).not.toThrow();
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, zero_stage: 2 }), 2)).toThrow(
      'zero_stage must be 0 (off) or 1 (AdamW state sharded over the ranks), got 2; use --zero_stage=1 or --zero_stage=0',
    );
    // ZeRO-1 shards the explicit step's AdamW state on both devices.
    const shardedGpuRanks = () => checkDataParallel(config({ gradient_accumulation_steps: 4, zero_stage: 1, device: 'cuda' }), 2);
    if (ncclBuilt()) expect(shardedGpuRanks).not.toThrow();
    else expect(shardedGpuRanks).toThrow(/run `npm run build:cuda:nccl`$/);
    expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, zero_stage: 1 }), 2)).not.toThrow();
    for (const ddp_timeout of [0, -5]) {
      expect(() => checkDataParallel(config({ gradient_accumulation_steps: 4, ddp_timeout }), 2)).toThrow(
        `ddp_timeout must be a positive number of seconds, got ${ddp_timeout}; use e.g. --ddp_timeout=600`,
      );
    }
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

    // One process, accumulating 2 x 2 micro-batches per step: rank r's micro-step m of iteration i trains on batch
    // i * 2 + m of the steps' batches seeded 1337 + r (rank 0's evaluations draw batches of their own).
    const config = resolveConfig(trainSchema, { device: 'cpu' });
    const streams = [0, 1].map((rank) => new BatchLoader(join(work, 'data', 'shakespeare_char'), 4, 32, config.seed + rank));
    const engine = Engine.create({ ...model, vocab_size: 65 }, config.seed, 'cpu', 'native');
    engine.configureOptimizer({ weight_decay: config.weight_decay, beta1: config.beta1, beta2: config.beta2, grad_clip: config.grad_clip });
    const losses: number[] = [];
    for (let iter = 0; iter < iters; iter++) {
      let rank0Loss = 0;
      for (const rank of [0, 1]) {
        for (let micro = 0; micro < accumulation / 2; micro++) {
          const { x, y } = streams[rank].step((iter * accumulation) / 2 + micro);
          const loss = engine.forwardBackward(x, y, 4, 1 / accumulation);
          if (rank === 0) rank0Loss = loss;
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

  it('shards the AdamW state with zero_stage=1 and trains, saves and resumes as without it', () => {
    // The run of the first test again (out-ddp, above), with each rank keeping half of the AdamW state.
    const iters = 6;
    const trained = run(
      'train',
      ...tiny,
      '--nproc_per_node=2',
      '--gradient_accumulation_steps=4',
      `--max_iters=${iters}`,
      `--eval_interval=${iters}`,
      '--always_save_checkpoint=True',
      '--zero_stage=1',
      '--out_dir=out-zero',
    );
    expect(trained.stderr).toBe('');
    expect(trained.status).toBe(0);
    expect(trained.stdout).toContain('ZeRO stage 1: each process keeps the AdamW state of 1/2 of the parameters');
    const losses = (dir: string) =>
      readFileSync(join(work, dir, 'log.jsonl'), 'utf8')
        .trim()
        .split('\n')
        .map((line) => JSON.parse(line) as TrainRecord)
        .filter((record) => record.kind === 'train')
        .map((record) => record.loss);
    const [zero, whole] = [losses('out-zero'), losses('out-ddp')];
    expect(zero).toHaveLength(iters + 1);
    for (let iter = 0; iter <= iters; iter++) expect(Math.abs(zero[iter] - whole[iter])).toBeLessThan(1e-5);
    // The checkpoint holds the whole AdamW state, gathered from both ranks: the one saved without sharding.
    for (const file of ['model.safetensors', 'optimizer.safetensors']) {
      const expected = readTensors(join(work, 'out-ddp', file));
      const saved = readTensors(join(work, 'out-zero', file));
      expect([...saved.keys()].sort()).toEqual([...expected.keys()].sort());
      let largest = 0;
      for (const [name, { data }] of expected) {
        const got = saved.get(name)!.data;
        for (let i = 0; i < data.length; i++) largest = Math.max(largest, Math.abs(got[i] - data[i]));
      }
      expect(largest, file).toBeLessThan(1e-5);
    }
    // It resumes on one process, and on two with the state sharded again.
    for (const processes of [[], ['--nproc_per_node=2', '--zero_stage=1']]) {
      const resume = ['train', ...tiny, '--init_from=resume', '--out_dir=out-zero', '--gradient_accumulation_steps=4', `--max_iters=${iters + 1}`, '--eval_interval=100000'];
      const resumed = run(...resume, ...processes);
      expect(resumed.stderr).toBe('');
      expect(resumed.status).toBe(0);
      // The checkpoint is of the evaluation at iteration 6, before its step.
      expect(resumed.stdout.match(/^iter \d+: /gm)).toEqual([`iter ${iters}: `, `iter ${iters + 1}: `]);
    }
  });

  it('resumes a checkpoint of two ranks on two into the run it came from, dropout masks and batches included', () => {
    const train = (...args: string[]) => {
      const result = run('train', ...tiny, '--dropout=0.1', '--nproc_per_node=2', '--gradient_accumulation_steps=4', '--eval_interval=2', ...args);
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
    };
    train('--max_iters=4', '--out_dir=out-ddp-whole');
    // Saves at iteration 2; the resumed run evaluates there again and trains on.
    train('--max_iters=2', '--out_dir=out-ddp-halves');
    train('--max_iters=4', '--out_dir=out-ddp-halves', '--init_from=resume');
    for (const file of ['model.safetensors', 'optimizer.safetensors']) {
      expect(readFileSync(join(work, 'out-ddp-halves', file)).equals(readFileSync(join(work, 'out-ddp-whole', file))), file).toBe(true);
    }
  });

  it('prints, logs and saves on rank 0 only', () => {
    // Each rank reads the config module itself, so each gets an out_dir of its own: only rank 0's may appear.
    writeFileSync(join(work, 'per-rank.js'), "export default { out_dir: 'out-rank' + process.env.OMPI_COMM_WORLD_RANK };\n");
    const trained = run('train', 'per-rank.js', ...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=2', '--eval_interval=2');
    expect(trained.stderr).toBe('');
    expect(trained.status).toBe(0);
    expect(readdirSync(join(work, 'out-rank0')).sort()).toEqual(['ckpt.json', 'log.jsonl', 'meta.json', 'model.safetensors', 'optimizer.safetensors']);
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

  it('refuses a world size that does not divide gradient_accumulation_steps, also when resuming', () => {
    const trained = run('train', ...tiny, '--gradient_accumulation_steps=2', '--max_iters=2', '--eval_interval=2', '--out_dir=out-one');
    expect(trained.status).toBe(0);
    const resumed = run('train', ...tiny, '--init_from=resume', '--out_dir=out-one', '--nproc_per_node=2', '--gradient_accumulation_steps=3', '--max_iters=4');
    expect(resumed.status).toBe(1);
    expect(resumed.stdout).toBe('');
    expect(resumed.stderr).toBe('error: gradient_accumulation_steps=3 must be divisible by the 2 processes, which share them out; use a multiple of 2\n');
  });

  it('resumes a checkpoint of one process on two', () => {
    // out-one (above) holds iteration 2 of a single process.
    const resumed = run('train', ...tiny, '--init_from=resume', '--out_dir=out-one', '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=4', '--eval_interval=4');
    expect(resumed.stderr).toBe('');
    expect(resumed.status).toBe(0);
    expect(resumed.stdout).toContain('data parallel: 2 processes, 1 gradient accumulation steps each');
    expect(resumed.stdout.match(/^iter \d+: /gm)).toEqual(['iter 2: ', 'iter 3: ', 'iter 4: ']);
    expect(JSON.parse(readFileSync(join(work, 'out-one', 'ckpt.json'), 'utf8')).iter_num).toBe(4);
  });

  it('stops every rank after the same step on Ctrl-C, saving a checkpoint that resumes on one process and on two', async () => {
    const marker = `nanogpt-ddp-stop-${process.pid}`;
    const job = startJob(work, marker, [...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=100000', '--eval_interval=100000', '--out_dir=out-stop']);
    try {
      job.onStdout((stdout) => {
        if (/^iter 3: /m.test(stdout)) {
          job.child.kill('SIGINT');
          return true;
        }
        return false;
      });
      const status = await job.closed;
      expect(job.stderr()).toBe('');
      expect(status).toBe(130);
      const stdout = job.stdout();
      expect(stdout.match(/^interrupted: stopping and saving a checkpoint/gm)).toHaveLength(1);
      const stopped = /^stopped at iteration (\d+); the checkpoint in out-stop resumes at iteration \d+: run the same command with --init_from=resume$/m.exec(stdout);
      expect(stopped).not.toBeNull();
      expect(stdout.match(/^stopped at iteration/gm)).toHaveLength(1);
      const last = Number(stopped![1]);
      expect(last).toBeGreaterThanOrEqual(3);
      expect(stdout).toContain(`iter ${last}: `);
      expect(stdout).not.toContain(`iter ${last + 1}: `);
      // The checkpoint resumes at the step after the last one taken.
      expect(JSON.parse(readFileSync(join(work, 'out-stop', 'ckpt.json'), 'utf8')).iter_num).toBe(last + 1);
      expect(await leftBehind(marker)).toEqual([]);

      // Neither resume checkpoints (no evaluation before max_iters), so both start from the same one.
      const resume = ['train', ...tiny, '--init_from=resume', '--out_dir=out-stop', '--gradient_accumulation_steps=2', `--max_iters=${last + 2}`, '--eval_interval=100000'];
      for (const processes of [[], ['--nproc_per_node=2']]) {
        const resumed = run(...resume, ...processes);
        expect(resumed.stderr).toBe('');
        expect(resumed.status).toBe(0);
        expect(resumed.stdout.match(/^iter \d+: /gm)).toEqual([`iter ${last + 1}: `, `iter ${last + 2}: `]);
      }
    } finally {
      job.kill();
    }
  });

  it('stops every rank when only rank 1 is asked, rank 0 announcing the stop and saving', async () => {
    // mpirun forwards a stop request to the ranks one by one, so rank 0 may learn of it from another rank first, and a
    // rank may get it after the stop: a second request to rank 1, once rank 0 announces the stop, must not end it.
    const marker = `nanogpt-ddp-stop-one-${process.pid}`;
    const job = startJob(work, marker, [...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=100000', '--eval_interval=100000', '--out_dir=out-stop-one']);
    try {
      let rank1: number | undefined;
      job.onStdout((stdout) => {
        if (rank1 === undefined && /^iter 3: /m.test(stdout)) {
          rank1 = rankProcess(marker, 1);
          process.kill(rank1, 'SIGUSR2');
        }
        if (rank1 === undefined || !/^interrupted: /m.test(stdout)) return false;
        try {
          process.kill(rank1, 'SIGUSR2');
        } catch {
          // Rank 1 has exited already.
        }
        return true;
      });
      const status = await job.closed;
      expect(job.stderr()).toBe('');
      expect(status).toBe(0);
      const stdout = job.stdout();
      expect(stdout.match(/^interrupted: stopping and saving a checkpoint/gm)).toHaveLength(1);
      const stopped = /^stopped at iteration (\d+); the checkpoint in out-stop-one resumes at iteration \d+: run the same command with --init_from=resume$/m.exec(stdout);
      expect(stopped).not.toBeNull();
      expect(JSON.parse(readFileSync(join(work, 'out-stop-one', 'ckpt.json'), 'utf8')).iter_num).toBe(Number(stopped![1]) + 1);
      expect(await leftBehind(marker)).toEqual([]);
    } finally {
      job.kill();
    }
  });

  it('stops the job when a rank hangs, once ddp_timeout has passed', async () => {
    const marker = `nanogpt-ddp-hang-${process.pid}`;
    const timeout = 4;
    const job = startJob(work, marker, [...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=100000', '--eval_interval=100000', `--ddp_timeout=${timeout}`, '--out_dir=out-hang']);
    try {
      let hungAt = 0;
      job.onStdout((stdout) => {
        if (!/^iter 3: /m.test(stdout)) return false;
        process.kill(rankProcess(marker, 1), 'SIGSTOP');
        hungAt = performance.now();
        return true;
      });
      const status = await job.closed;
      const waited = (performance.now() - hungAt) / 1000;
      expect(hungAt).toBeGreaterThan(0);
      expect(status).toBe(1);
      // Rank 0 may have been waiting for a step already when rank 1 stopped; mpirun then needs a moment to end the job.
      expect(waited).toBeGreaterThan(timeout - 1);
      expect(waited).toBeLessThan(timeout + 15);
      const lines = job.stderr().trim().split('\n');
      expect(lines).toContainEqual(
        expect.stringMatching(
          new RegExp(
            `^error: rank 0 waited ${timeout} s in (the gradient all-reduce|the all-reduce of a stop or save flag) for the other ranks; one of them is hung \\(or rank 0 evaluated for longer than that\\); the job was stopped; resume from the last checkpoint with --init_from=resume, or raise ddp_timeout$`,
          ),
        ),
      );
      // mpirun continues the stopped rank to end it: that rank was not waiting for the others, and says nothing.
      expect(lines.filter((line) => line.startsWith('error: rank 1 '))).toEqual([]);
      expect(lines.at(-1)).toBe('error: rank 0 exited with code 1 (its error is above); the job was stopped');
      expect(await leftBehind(marker)).toEqual([]);
    } finally {
      job.kill();
    }
  });

  it('pauses the whole job on Ctrl-Z, for longer than ddp_timeout, and carries on after fg', async () => {
    const marker = `nanogpt-ddp-pause-${process.pid}`;
    const job = startJob(work, marker, [...tiny, '--nproc_per_node=2', '--gradient_accumulation_steps=2', '--max_iters=300', '--eval_interval=100000', '--ddp_timeout=2', '--out_dir=out-pause']);
    try {
      let paused: Promise<void> | undefined;
      job.onStdout((stdout) => {
        if (!/^iter 3: /m.test(stdout)) return false;
        job.child.kill('SIGTSTP');
        paused = (async () => {
          try {
            await new Promise((resolve) => setTimeout(resolve, 1000));
            const ranks = [0, 1].map((rank) => rankProcess(marker, rank));
            expect(ranks.map(processState)).toEqual(['T', 'T']);
            const printed = job.stdout().length;
            await new Promise((resolve) => setTimeout(resolve, 3000));
            expect(job.stdout().length).toBe(printed);
          } finally {
            job.child.kill('SIGCONT');
          }
        })();
        return true;
      });
      const status = await job.closed;
      await paused;
      expect(job.stderr()).toBe('');
      expect(status).toBe(0);
      expect(job.stdout()).toContain('iter 300: ');
    } finally {
      job.kill();
    }
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
  const pid = jobProcesses(marker).find(({ environ }) => environ.includes(`OMPI_COMM_WORLD_RANK=${rank}`))?.pid;
  if (pid === undefined) throw new Error(`no process of rank ${rank} found`);
  return pid;
}

/** The state letter of process `pid` (R running, S sleeping, T stopped, ...). */
function processState(pid: number): string {
  return /\) (\S) /.exec(readFileSync(`/proc/${pid}/stat`, 'latin1'))![1];
}

/** The live processes (launcher, mpirun, ranks) whose environment holds NANOGPT_TEST_JOB=`marker`. */
function jobProcesses(marker: string): { pid: number; environ: string[] }[] {
  const found: { pid: number; environ: string[] }[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const environ = readFileSync(join('/proc', entry, 'environ'), 'latin1').split('\0');
      // A zombie (exited, not yet reaped) has no environment left and is no longer running.
      if (environ.includes(`NANOGPT_TEST_JOB=${marker}`)) found.push({ pid: Number(entry), environ });
    } catch {
      continue;
    }
  }
  return found;
}

/** The job's processes still alive a few seconds after it ended (mpirun's children are reaped by then). */
async function leftBehind(marker: string): Promise<number[]> {
  for (let tries = 0; tries < 50 && jobProcesses(marker).length > 0; tries++) await new Promise((resolve) => setTimeout(resolve, 100));
  return jobProcesses(marker).map(({ pid }) => pid);
}

/**
 * `nanogpt-rs train <args>` on the launcher in `cwd`, its processes marked with `marker`; `onStdout` sees the output so far
 * after each chunk until it returns true. `kill` continues and kills whatever of the job is left.
 */
function startJob(cwd: string, marker: string, args: string[]) {
  const child = spawn(process.execPath, [cli, 'train', ...args], { cwd, env: { ...process.env, NANOGPT_TEST_JOB: marker } });
  let stdout = '';
  let stderr = '';
  let watcher: ((stdout: string) => boolean) | undefined;
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    if (watcher?.(stdout)) watcher = undefined;
  });
  return {
    child,
    closed: new Promise<number | null>((resolve) => child.on('close', resolve)),
    onStdout: (watch: (stdout: string) => boolean) => (watcher = watch),
    stdout: () => stdout,
    stderr: () => stderr,
    kill: () => {
      for (const { pid } of jobProcesses(marker)) {
        for (const signal of ['SIGCONT', 'SIGKILL'] as const) {
          try {
            process.kill(pid, signal);
          } catch {
            // Gone already.
          }
        }
      }
    },
  };
}
