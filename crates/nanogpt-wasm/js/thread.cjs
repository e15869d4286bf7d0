// One thread of the WebAssembly engine's pool (see crates/nanogpt-wasm/src/threads.rs): the same module on the
// same shared memory, running the rayon work loop it was handed.
const { workerData } = require('node:worker_threads');
const engine = require(workerData.glue);
engine.initSync({ module: workerData.module, memory: workerData.memory });
engine.runThread(workerData.thread);
