// Preloaded into every process of a run by bench/zero.sh (NODE_OPTIONS=--require): at exit, writes the process's peak
// resident memory (VmHWM, in KiB) to $PEAK_MEMORY_DIR/rank-<its MPI rank>, or launcher for the process that started them.
const { readFileSync, writeFileSync } = require('node:fs');

process.on('exit', () => {
  const peak = /VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  const rank = process.env.OMPI_COMM_WORLD_RANK ?? 'launcher';
  if (peak) writeFileSync(`${process.env.PEAK_MEMORY_DIR}/rank-${rank}`, `${peak[1]}\n`);
});
