// Runs a registered kernel over its grid: for each block in turn, the launch's worker threads (one per
// CUDA thread of a block) run the kernel together, with a fresh barrier per block for __syncthreads, one
// per warp for shuffles, mma.sync and __syncwarp, and dynamic shared memory filled with NaNs so that a read before
// a write shows. A thread that returns leaves its barriers, as an exited CUDA thread stops counting.
// The worker threads outlive launches: starting up to 1024 threads costs more than most test launches.

#include <pthread.h>

#include <barrier>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_on_cpu.h"

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;

extern "C" void cuda_on_cpu_register_all();

namespace cuda_on_cpu {
namespace {

struct Kernel {
  size_t arity;
  void (*thunk)(void*, void**);
  void* function;
};

std::map<std::string, Kernel>& kernels() {
  static std::map<std::string, Kernel> table;
  return table;
}

// The launch in progress; launches are serialised.
struct Launch {
  const Kernel* kernel;
  void** params;
  unsigned threads;
  uint64_t blocks;
  // Asynchronous copies land as issued (true) or at the barrier after their wait (cuda_on_cpu.h).
  bool early_copies;
  std::unique_ptr<std::barrier<>> block_start, block_end;
  std::unique_ptr<std::barrier<>> block_sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<uint64_t> slots;
  // Dynamic shared memory, aligned as a GPU's is.
  struct alignas(128) Line {
    unsigned char bytes[128];
  };
  std::vector<Line> shared;
};
Launch* current = nullptr;
thread_local unsigned thread_index;

dim3 unflatten(uint64_t i, dim3 shape) {
  dim3 d;
  d.x = (unsigned)(i % shape.x);
  d.y = (unsigned)(i / shape.x % shape.y);
  d.z = (unsigned)(i / shape.x / shape.y);
  return d;
}

// The worker threads, created as launches need more of them and parked between launches.
struct Pool {
  std::mutex mutex;
  std::condition_variable wake, finished;
  // Counts launches; a worker runs each one whose block has a thread of its index.
  uint64_t generation = 0;
  // The current launch's threads per block (workers of higher index sit it out), and how many of them
  // have not finished it.
  unsigned threads = 0;
  unsigned busy = 0;
  unsigned started = 0;
};

// Never destroyed: parked workers still wait on it while the process exits.
Pool& pool() {
  static Pool* instance = new Pool;
  return *instance;
}

// One worker's share of a launch: its thread in every block, in turn.
void run_blocks(Launch& launch) {
  threadIdx = unflatten(thread_index, blockDim);
  for (uint64_t b = 0; b < launch.blocks; ++b) {
    launch.block_start->arrive_and_wait();
    blockIdx = unflatten(b, gridDim);
    launch.kernel->thunk(launch.kernel->function, launch.params);
    land_pending_copies();
    launch.block_sync->arrive_and_drop();
    launch.warp_sync[thread_index / 32]->arrive_and_drop();
    launch.block_end->arrive_and_wait();
  }
}

void* worker(void* arg) {
  thread_index = (unsigned)(uintptr_t)arg;
  Pool& p = pool();
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(p.mutex);
  for (;;) {
    p.wake.wait(lock, [&] { return p.generation != seen; });
    seen = p.generation;
    if (thread_index >= p.threads) continue;
    lock.unlock();
    run_blocks(*current);
    lock.lock();
    if (--p.busy == 0) p.finished.notify_one();
  }
}

// Starts workers until there are `threads`; called with the pool's lock held.
void start_workers(Pool& p, unsigned threads, const char* name) {
  pthread_attr_t attributes;
  pthread_attr_init(&attributes);
  pthread_attr_setstacksize(&attributes, 1 << 20);
  for (; p.started < threads; ++p.started) {
    pthread_t thread;
    if (pthread_create(&thread, &attributes, worker, (void*)(uintptr_t)p.started) != 0) {
      fprintf(stderr, "cuda-on-cpu: cannot start thread %u for %s\n", p.started, name);
      abort();
    }
    pthread_detach(thread);
  }
  pthread_attr_destroy(&attributes);
}

void fresh_block(Launch& launch) {
  launch.block_sync = std::make_unique<std::barrier<>>(launch.threads);
  launch.warp_sync.clear();
  for (unsigned first = 0; first < launch.threads; first += 32)
    launch.warp_sync.push_back(std::make_unique<std::barrier<>>(std::min(32u, launch.threads - first)));
  memset(launch.shared.data(), 0xff, launch.shared.size() * sizeof(Launch::Line));
}

int fail(char* error, size_t len, const std::string& message) {
  snprintf(error, len, "%s", message.c_str());
  return 1;
}

}  // namespace

void* dynamic_shared() { return current->shared.data(); }
void syncthreads() {
  land_completed_copies();
  current->block_sync->arrive_and_wait();
}
void syncwarp() { current->warp_sync[thread_index / 32]->arrive_and_wait(); }
unsigned thread_in_block() { return thread_index; }
bool copies_land_early() { return current->early_copies; }
uint64_t* exchange_slots() { return current->slots.data(); }

void add_kernel(const char* name, size_t arity, void (*thunk)(void*, void**), void* function) {
  kernels()[name] = Kernel{arity, thunk, function};
}

}  // namespace cuda_on_cpu

extern "C" int cuda_on_cpu_launch(const char* name, const uint32_t* grid, const uint32_t* block, uint32_t shared_bytes,
                                  void** params, size_t n_params, bool early_copies, char* error, size_t error_len) {
  using namespace cuda_on_cpu;
  static std::mutex one_at_a_time;
  static std::once_flag registered;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  std::call_once(registered, cuda_on_cpu_register_all);

  auto found = kernels().find(name);
  if (found == kernels().end()) return fail(error, error_len, std::string("no CUDA kernel named ") + name);
  const Kernel& kernel = found->second;
  if (kernel.arity != n_params)
    return fail(error, error_len,
                std::string(name) + " takes " + std::to_string(kernel.arity) + " arguments, not " + std::to_string(n_params));
  const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
  if (threads == 0 || threads > 1024 || block[2] > 64)
    return fail(error, error_len, std::string(name) + ": a block has 1 to 1024 threads, at most 64 in z");
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535)
    return fail(error, error_len, std::string(name) + ": grid dimensions are 1 to 2^31-1 in x and 1 to 65535 in y and z");
  if (shared_bytes > 227 * 1024)
    return fail(error, error_len, std::string(name) + ": more than the 227 KiB of shared memory a Hopper block can have");

  Launch launch;
  launch.kernel = &kernel;
  launch.params = params;
  launch.threads = (unsigned)threads;
  launch.early_copies = early_copies;
  launch.blocks = (uint64_t)grid[0] * grid[1] * grid[2];
  launch.block_start = std::make_unique<std::barrier<>>(threads + 1);
  launch.block_end = std::make_unique<std::barrier<>>(threads + 1);
  launch.slots.assign((size_t)threads * SLOT_WORDS, 0);
  launch.shared.assign((shared_bytes + sizeof(Launch::Line) - 1) / sizeof(Launch::Line), Launch::Line{});
  current = &launch;
  blockDim = dim3{block[0], block[1], block[2]};
  gridDim = dim3{grid[0], grid[1], grid[2]};

  Pool& p = pool();
  {
    std::lock_guard<std::mutex> pool_lock(p.mutex);
    start_workers(p, launch.threads, name);
    p.threads = p.busy = launch.threads;
    ++p.generation;
  }
  p.wake.notify_all();
  for (uint64_t b = 0; b < launch.blocks; ++b) {
    fresh_block(launch);
    launch.block_start->arrive_and_wait();
    launch.block_end->arrive_and_wait();
  }
  {
    std::unique_lock<std::mutex> pool_lock(p.mutex);
    p.finished.wait(pool_lock, [&] { return p.busy == 0; });
  }
  current = nullptr;
  return 0;
}
