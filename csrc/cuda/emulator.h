// A CPU emulation of the CUDA execution model, just enough to run csrc/cuda's kernels, unchanged, in the
// CPU tests (tests/emulated_cuda builds them with BIPKERNELS_EMULATE_CUDA; launch.cuh switches here).
//
// A launch runs its blocks one after another; the threads of a block run as fibers on the calling OS
// thread and switch only at __syncthreads, so each stretch between two barriers runs one thread at a time
// in the order set_schedule chooses: forward, reverse, or a fresh shuffle per stretch. A kernel whose
// result depends on that order (a thread reading shared memory that another thread writes without a
// barrier between) therefore gives a different result under some schedule, and a barrier that some
// threads of a block reach while others return is reported as an error. Shared memory is a function-local
// static (the blocks never overlap), atomics are plain read-modify-writes (one thread runs at a time).
// What it cannot show: the GPU's memory model, warps, out-of-bounds accesses the CPU tolerates, speed.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include <c10/util/Exception.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

// threadIdx, blockIdx, blockDim and gridDim of the running fiber (one-dimensional launches only).
struct EmulatedDim {
  unsigned int x = 0, y = 0, z = 0;
};
inline EmulatedDim threadIdx, blockIdx, blockDim, gridDim;

namespace bipkernels::emulator {

enum Schedule : int64_t { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Settings {
  Schedule schedule = kForward;
  std::mt19937_64 random{0};
};
inline Settings settings;

inline void set_schedule(int64_t schedule, int64_t seed) {
  TORCH_CHECK(schedule >= kForward && schedule <= kShuffled,
              "bipkernels emulator: schedule must be 0 (forward), 1 (reverse) or 2 (shuffled), got ", schedule);
  settings.schedule = static_cast<Schedule>(schedule);
  settings.random.seed(static_cast<uint64_t>(seed));
}

// The fibers of the block that runs now. Stacks are allocated once and reused by every block.
struct Block {
  static constexpr size_t kStackBytes = 256 * 1024;  // new char[] leaves them untouched: virtual until used
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool finished = false, at_barrier = false;
  };
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned int running = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};
inline Block current_block;

inline void fiber_entry() {
  Block::Fiber& fiber = current_block.fibers[current_block.running];
  try {
    (*current_block.body)();
  } catch (...) {
    if (!current_block.error) current_block.error = std::current_exception();
  }
  fiber.finished = true;  // returning resumes current_block.scheduler (uc_link)
}

inline void sync_threads() {
  Block::Fiber& fiber = current_block.fibers[current_block.running];
  fiber.at_barrier = true;
  swapcontext(&fiber.context, &current_block.scheduler);
}

// Runs `body` as every thread of block blockIdx.x, stretch by stretch between barriers.
inline void run_block(unsigned int threads, const std::function<void()>& body) {
  if (current_block.fibers.size() < threads) current_block.fibers.resize(threads);
  current_block.body = &body;
  current_block.error = nullptr;
  for (unsigned int t = 0; t < threads; ++t) {
    Block::Fiber& fiber = current_block.fibers[t];
    if (!fiber.stack) fiber.stack.reset(new char[Block::kStackBytes]);
    fiber.finished = fiber.at_barrier = false;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = Block::kStackBytes;
    fiber.context.uc_link = &current_block.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  std::vector<unsigned int> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  if (settings.schedule == kReverse) std::reverse(order.begin(), order.end());
  for (int64_t stretch = 0;; ++stretch) {
    if (settings.schedule == kShuffled) std::shuffle(order.begin(), order.end(), settings.random);
    for (const unsigned int t : order) {
      Block::Fiber& fiber = current_block.fibers[t];
      if (fiber.finished) continue;
      fiber.at_barrier = false;
      current_block.running = t;
      threadIdx.x = t;
      swapcontext(&current_block.scheduler, &fiber.context);
    }
    if (current_block.error) std::rethrow_exception(current_block.error);
    const auto waiting = std::count_if(current_block.fibers.begin(), current_block.fibers.begin() + threads,
                                       [](const Block::Fiber& fiber) { return fiber.at_barrier; });
    if (waiting == 0) return;
    TORCH_CHECK(waiting == static_cast<int64_t>(threads), "bipkernels emulator: block ", blockIdx.x, ": ", waiting,
                " of ", threads, " threads wait at __syncthreads (stretch ", stretch,
                ") while the others have returned: a barrier not every thread reaches");
  }
}

// Runs body() as every thread of a grid of `grid` blocks of `threads` threads.
inline void run_grid(unsigned int grid, unsigned int threads, const std::function<void()>& body) {
  TORCH_CHECK(grid >= 1 && threads >= 1 && threads <= 1024, "bipkernels emulator: launch of ", grid, " blocks of ",
              threads, " threads (CUDA allows 1 to 1024 threads a block)");
  gridDim.x = grid;
  blockDim.x = threads;
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx.x = b;
    run_block(threads, body);
  }
}

}  // namespace bipkernels::emulator

inline void __syncthreads() { bipkernels::emulator::sync_threads(); }

// One thread runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
