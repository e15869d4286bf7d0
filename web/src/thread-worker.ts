// One thread of the engine's pool (see crates/nanogpt-wasm/src/threads.rs): the same module on the same shared
// memory, running the work loop it is handed. It instantiates the module first and says so; only then does the
// training worker start the pool, which blocks that worker until every thread runs (a worker that is blocked
// could not finish starting the nested workers it created).
type ThreadMessage = { glue: string; module: WebAssembly.Module; memory: WebAssembly.Memory } | { thread: number };

let engine: { runThread(thread: number): void };

self.onmessage = async ({ data }: MessageEvent<ThreadMessage>) => {
  if ('thread' in data) return engine.runThread(data.thread);
  const glue = (await import(data.glue)) as typeof engine & {
    default(options: { module_or_path: WebAssembly.Module; memory: WebAssembly.Memory }): Promise<unknown>;
  };
  await glue.default({ module_or_path: data.module, memory: data.memory });
  engine = glue;
  self.postMessage('ready');
};
