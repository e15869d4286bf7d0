// Runs prepareCorpus in its own process for test/corpus.test.ts (memory and kill tests). argv[2] is a JSON
// CorpusOptions plus `killAfterCheckpoints` (SIGKILL itself shortly after that many journal writes). Prints one
// JSON line: the result and the peak resident memory of the whole process (workers included).
import { readFileSync } from 'node:fs';
import { prepareCorpus, type CorpusOptions } from '../ts/corpus.ts';

const { killAfterCheckpoints, ...options } = JSON.parse(process.argv[2]) as CorpusOptions & { killAfterCheckpoints?: number };
let peakSampled = 0;
const sampler = setInterval(() => (peakSampled = Math.max(peakSampled, process.memoryUsage.rss())), 20);
let checkpoints = 0;
const result = await prepareCorpus({
  ...options,
  log: (line) => console.error(line),
  progressStream: process.stderr,
  onCheckpoint: () => {
    if (killAfterCheckpoints !== undefined && ++checkpoints === killAfterCheckpoints) setTimeout(() => process.kill(process.pid, 'SIGKILL'), 30);
  },
});
clearInterval(sampler);
const hwm = /VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
const peakRss = Math.max(peakSampled, hwm ? Number(hwm[1]) * 1024 : 0);
console.log(JSON.stringify({ ...result, peakRss }));
