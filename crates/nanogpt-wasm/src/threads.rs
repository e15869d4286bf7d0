//! Threads for a module built with atomics and shared memory: rayon's global pool (which the engine's gemm and
//! fused kernels use) gets its workers from the host. The host instantiates this same module on the same memory
//! in a worker thread and calls `runThread` there with the pointer it was given.

use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    /// Set by the host before it loads the module: starts a worker that calls `runThread(thread)`.
    #[wasm_bindgen(js_namespace = globalThis, js_name = nanogptSpawnThread)]
    fn spawn_thread(thread: u32);
}

/// Starts a pool of `count` threads; call once, before the first engine call.
#[wasm_bindgen(js_name = startThreads)]
pub fn start_threads(count: usize) -> Result<(), JsError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(count)
        .spawn_handler(|thread| {
            spawn_thread(Box::into_raw(Box::new(thread)) as u32);
            Ok(())
        })
        .build_global()
        .map_err(|e| JsError::new(&format!("cannot start the thread pool: {e}")))
}

/// The body of one pool thread: runs rayon's work loop until the process ends.
#[wasm_bindgen(js_name = runThread)]
pub fn run_thread(thread: u32) {
    // SAFETY: `thread` is the pointer `start_threads` leaked for exactly one worker, which calls this once.
    let thread = unsafe { Box::from_raw(thread as *mut rayon::ThreadBuilder) };
    thread.run();
}
