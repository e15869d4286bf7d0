// One thread of the engine's pool (see crates/nanogpt-wasm/src/threads.rs): the same module on the same shared
// memory, running the work loop it was handed. It says when it is up, because the training worker must not block
// on the pool before every thread has started.
interface ThreadStart {
  glue: string;
  module: WebAssembly.Module;
  memory: WebAssembly.Memory;
  thread: number;
}

self.onmessage = async ({ data }: MessageEvent<ThreadStart>) => {
  const engine = (await import(data.glue)) as {
    default(options: { module_or_path: WebAssembly.Module; memory: WebAssembly.Memory }): Promise<unknown>;
    runThread(thread: number): void;
  };
  await engine.default({ module_or_path: data.module, memory: data.memory });
  self.postMessage('started');
  engine.runThread(data.thread);
};
