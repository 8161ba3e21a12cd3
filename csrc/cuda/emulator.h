// A CPU emulation of the CUDA execution model, just enough to run csrc/cuda's kernels, unchanged, in the
// CPU tests (tests/emulated_cuda builds them with BIPKERNELS_EMULATE_CUDA; launch.cuh switches here).
//
// A launch runs its blocks one after another; the threads of a block run as fibers on the calling OS
// thread and switch only at __syncthreads, so each stretch between two barriers runs one thread at a time.
// set_schedule chooses the order of both, blocks and threads: forward, reverse, or a fresh shuffle per
// launch and per stretch. A kernel whose result depends on that order (a thread reading shared memory
// that another thread writes without a barrier between) therefore gives a different result under some
// schedule; threads of a block that wait at different barriers, or some at a barrier while others
// return, are reported as an error. Shared memory is a function-local static in a section of its own,
// filled with 0xff bytes (NaN, or huge integers) before every block, so a read before any write this
// block shows. Launches take at most kMaxEmulatedGrid blocks (launch.cuh: kMaxGrid), so the grid-stride
// loops take several turns. What it cannot show: the GPU's memory model; missing atomics (a thread's
// read-modify-write is never interrupted); blocks that run at the same time; warps; out-of-bounds
// accesses the CPU tolerates; speed.
//
// Fibers switch by a few instructions of x86-64 assembly (swapcontext makes two signal-mask system calls
// a switch: an emulated select over 700 tensors took 0.31 s with it, 0.07 s with this), so the emulation
// is x86-64 only, and not with CET shadow stacks, which a stack switch by hand would break.
#pragma once

#if !defined(__x86_64__)
#error "the bipkernels CUDA emulation runs on x86-64 only"
#endif
#if defined(__CET__) && (__CET__ & 2)
#error "the bipkernels CUDA emulation switches stacks by hand: build it with -fcf-protection=none"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include <c10/util/Exception.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static __attribute__((section("bipkernels_shared")))
#define __syncthreads() bipkernels::emulator::sync_threads(__FILE__, __LINE__)

// The bounds of the section that holds every __shared__ variable (the linker defines them).
extern "C" __attribute__((visibility("hidden"))) char __start_bipkernels_shared[];
extern "C" __attribute__((visibility("hidden"))) char __stop_bipkernels_shared[];

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

// switch_stack(&from, to): pushes the callee-saved registers and the SSE and x87 control words (the
// System V ABI's callee-saved state) on the current stack, stores the stack pointer in `from`, and pops
// the same from the stack `to` (saved so, or made by start_stack), returning where that stack left off.
// Weak: every translation unit that includes this header emits it.
extern "C" void bipkernels_emulator_switch_stack(void** from, void* to);
asm(R"(
  .pushsection .text
  .weak bipkernels_emulator_switch_stack
  .hidden bipkernels_emulator_switch_stack
  .type bipkernels_emulator_switch_stack, @function
bipkernels_emulator_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size bipkernels_emulator_switch_stack, .-bipkernels_emulator_switch_stack
  .popsection
)");

// A stack on which the first switch_stack to it enters `entry` (which must never return) as if called:
// the frame switch_stack pops (control words, six zero registers, `entry` as the return address) below
// a zero return address for `entry` itself, so that it starts with the stack alignment of a call.
inline void* start_stack(char* stack, size_t bytes, void (*entry)()) {
  auto* slot = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  *--slot = 0;
  *--slot = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--slot = 0;
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  std::memcpy(--slot, control, sizeof(control));
  return slot;
}

// A fiber's stack: mapped memory (untouched pages cost nothing) above a page that faults, so that an
// overflow stops at once instead of overwriting the heap.
class Stack {
 public:
  static constexpr size_t kBytes = 256 * 1024;
  Stack() {
    const size_t guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mapped = mmap(nullptr, guard + kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(mapped != MAP_FAILED, "bipkernels emulator: cannot map a fiber stack");
    TORCH_CHECK(mprotect(mapped, guard, PROT_NONE) == 0, "bipkernels emulator: cannot protect a stack guard");
    base_ = static_cast<char*>(mapped);
    usable_ = base_ + guard;
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, static_cast<size_t>(usable_ - base_) + kBytes); }
  char* usable() const { return usable_; }

 private:
  char* base_ = nullptr;
  char* usable_ = nullptr;
};

// The fibers of the block that runs now. Stacks are made once and reused by every block.
struct Block {
  struct Fiber {
    void* stack_pointer = nullptr;
    std::unique_ptr<Stack> stack;
    bool finished = false, at_barrier = false;
    const char* barrier_file = nullptr;  // where it waits: the same barrier for every thread
    int barrier_line = 0;
  };
  std::vector<Fiber> fibers;
  void* scheduler = nullptr;
  unsigned int running = 0;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};
inline Block current_block;

[[noreturn]] inline void fiber_entry() {
  Block::Fiber& fiber = current_block.fibers[current_block.running];
  try {
    (*current_block.body)();
  } catch (...) {
    if (!current_block.error) current_block.error = std::current_exception();
  }
  fiber.finished = true;
  bipkernels_emulator_switch_stack(&fiber.stack_pointer, current_block.scheduler);
  __builtin_unreachable();  // a finished fiber is never resumed
}

inline void sync_threads(const char* file, int line) {
  Block::Fiber& fiber = current_block.fibers[current_block.running];
  fiber.at_barrier = true;
  fiber.barrier_file = file;
  fiber.barrier_line = line;
  bipkernels_emulator_switch_stack(&fiber.stack_pointer, current_block.scheduler);
}

// Every __shared__ byte set to 0xff, as uninitialised shared memory that holds nothing useful.
inline void poison_shared_memory() {
  const auto bytes = static_cast<size_t>(__stop_bipkernels_shared - __start_bipkernels_shared);
  std::memset(__start_bipkernels_shared, 0xff, bytes);
}

// 0, 1, ..., count - 1 in the schedule's order (shuffled afresh on every call).
inline std::vector<unsigned int> scheduled_order(unsigned int count) {
  std::vector<unsigned int> order(count);
  std::iota(order.begin(), order.end(), 0u);
  if (settings.schedule == kReverse) std::reverse(order.begin(), order.end());
  if (settings.schedule == kShuffled) std::shuffle(order.begin(), order.end(), settings.random);
  return order;
}

// Runs `body` as every thread of block blockIdx.x, stretch by stretch between barriers.
inline void run_block(unsigned int threads, const std::function<void()>& body) {
  if (current_block.fibers.size() < threads) current_block.fibers.resize(threads);
  current_block.body = &body;
  current_block.error = nullptr;
  poison_shared_memory();
  for (unsigned int t = 0; t < threads; ++t) {
    Block::Fiber& fiber = current_block.fibers[t];
    if (!fiber.stack) fiber.stack = std::make_unique<Stack>();
    fiber.finished = fiber.at_barrier = false;
    fiber.stack_pointer = start_stack(fiber.stack->usable(), Stack::kBytes, fiber_entry);
  }
  for (int64_t stretch = 0;; ++stretch) {
    for (const unsigned int t : scheduled_order(threads)) {
      Block::Fiber& fiber = current_block.fibers[t];
      if (fiber.finished) continue;
      fiber.at_barrier = false;
      current_block.running = t;
      threadIdx.x = t;
      bipkernels_emulator_switch_stack(&current_block.scheduler, fiber.stack_pointer);
    }
    if (current_block.error) std::rethrow_exception(current_block.error);
    const Block::Fiber& first = current_block.fibers[0];
    const auto waiting = std::count_if(current_block.fibers.begin(), current_block.fibers.begin() + threads,
                                       [](const Block::Fiber& fiber) { return fiber.at_barrier; });
    if (waiting == 0) return;
    TORCH_CHECK(waiting == static_cast<int64_t>(threads), "bipkernels emulator: block ", blockIdx.x, ": ", waiting,
                " of ", threads, " threads wait at __syncthreads (stretch ", stretch,
                ") while the others have returned: a barrier not every thread reaches");
    for (unsigned int t = 1; t < threads; ++t) {
      const Block::Fiber& fiber = current_block.fibers[t];
      const bool same = fiber.barrier_line == first.barrier_line &&
                        std::strcmp(fiber.barrier_file, first.barrier_file) == 0;
      TORCH_CHECK(same,
                  "bipkernels emulator: block ", blockIdx.x, ": thread 0 waits at the __syncthreads of ",
                  first.barrier_file, ":", first.barrier_line, ", thread ", t, " at ", fiber.barrier_file, ":",
                  fiber.barrier_line, " (stretch ", stretch, "): threads of a block at different barriers");
    }
  }
}

// The most blocks the emulated launches take (launch.cuh: kMaxGrid): few, so that the kernels'
// grid-stride loops give every thread several turns even on small inputs.
constexpr unsigned int kMaxEmulatedGrid = 3;

// Runs body() as every thread of a grid of `grid` blocks of `threads` threads. One launch at a time in
// the process: the fibers, threadIdx and shared memory are the process's.
inline void run_grid(unsigned int grid, unsigned int threads, const std::function<void()>& body) {
  static std::mutex one_launch;
  const std::lock_guard<std::mutex> lock(one_launch);
  TORCH_CHECK(grid >= 1 && threads >= 1 && threads <= 1024, "bipkernels emulator: launch of ", grid, " blocks of ",
              threads, " threads (CUDA allows 1 to 1024 threads a block)");
  gridDim.x = grid;
  blockDim.x = threads;
  for (const unsigned int b : scheduled_order(grid)) {
    blockIdx.x = b;
    run_block(threads, body);
  }
}

}  // namespace bipkernels::emulator

// One thread runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
