// CUDA kernel of bipkernels::topk_threshold: the multi-pass radix select of gpu_select.h over all the
// tensors of the list at once (no concatenated copy), the result left on the device.
//
// Launches per call, for L tensors in G = ceil(L / 128) groups: for each of the 3 (float keys) or 6
// (double keys) passes, G histogram launches and one choice step; then G tie-count launches and G row
// launches, which return at once unless the k-th value is tied and cut. No host synchronisation, so the
// call can be captured in a CUDA graph. The decisions are gpu_select.h's; tests/test_cuda_emulated.py runs
// this file, kernels and launches, on the CPU emulation (emulator.h).
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bipkernels/checks.h"
#include "bipkernels/gpu_select.h"
#include "cuda/launch.cuh"

namespace bipkernels::cuda {
namespace {

constexpr int kChooseThreads = 1024;  // each thread tests two buckets
constexpr int kRowThreads = 1024;
static_assert(2 * kChooseThreads == kGpuBuckets, "the choice step gives each thread two buckets");

template <typename in_t>
using KeyOf = typename SelectKey<at::opmath_type<in_t>>::type;

template <bool Absolute, typename in_t>
__device__ __forceinline__ KeyOf<in_t> key_at(const in_t* data, int64_t index) {
  return select_key(ranked_score<Absolute>(static_cast<at::opmath_type<in_t>>(data[index])));
}

// Blocks for a pass over `chunks` chunks: enough to fill the device, and few enough chunks per block that
// its 32-bit shared-memory counts cannot overflow (2^19 chunks of 4096 scores = 2^31).
unsigned int blocks_for_chunks(int64_t chunks, int device) {
  const int64_t fill = std::min<int64_t>(chunks, 4 * int64_t(multiprocessor_count(device)));
  return static_cast<unsigned int>(std::max<int64_t>(fill, ceil_div(chunks, int64_t(1) << 19)));
}

// Pass `pass`: adds this group's counts of histogram_slot to `histogram` (kGpuBuckets + 1 slots).
template <typename in_t, bool Absolute>
__global__ void histogram_kernel(SegmentTable<in_t> table, int pass, const SelectState* state_ptr,
                                 unsigned long long* histogram) {
  using key_t = KeyOf<in_t>;
  __shared__ unsigned int local[kGpuBuckets + 1];
  for (int slot = threadIdx.x; slot <= kGpuBuckets; slot += blockDim.x) local[slot] = 0;
  __syncthreads();
  // Pass 0 runs before the state is written: it needs no prefix.
  const SelectState state = pass == 0 ? SelectState{} : *state_ptr;
  if (pass == 0 || state.kept > 0) {
    const key_t prefix = static_cast<key_t>(state.prefix);
    for (int64_t chunk = blockIdx.x; chunk < table.chunks(); chunk += gridDim.x) {
      const ChunkSpan span = chunk_span(table, chunk, kSelectChunk);
      const in_t* data = table.data[span.tensor];
      for (int64_t j = span.begin + threadIdx.x; j < span.end; j += blockDim.x) {
        const int64_t slot = histogram_slot(key_at<Absolute>(data, j), prefix, pass);
        if (slot >= 0) atomicAdd(&local[slot], 1u);
      }
    }
  }
  __syncthreads();
  for (int slot = threadIdx.x; slot <= kGpuBuckets; slot += blockDim.x) {
    if (local[slot] != 0) atomicAdd(&histogram[slot], static_cast<unsigned long long>(local[slot]));
  }
}

// After pass `pass`: every bucket is tested at once for the remaining-th largest key (bucket_holds),
// the winner appends its digit to the state, and the histogram is cleared for the next pass.
template <typename key_t>
__global__ void choose_kernel(unsigned long long* histogram, SelectState* state_ptr, int pass, int64_t k,
                              int64_t total) {
  __shared__ int64_t suffix[kChooseThreads];
  if (pass == 0 && threadIdx.x == 0) start_select(*state_ptr, k, total, static_cast<int64_t>(histogram[kGpuBuckets]));
  __syncthreads();
  const SelectState state = *state_ptr;
  const int64_t low = 2 * threadIdx.x, high = low + 1;
  const int64_t low_count = static_cast<int64_t>(histogram[low]), high_count = static_cast<int64_t>(histogram[high]);
  // Inclusive suffix sums of the pairs' counts (Hillis-Steele): suffix[t] = keys in buckets >= 2t.
  suffix[threadIdx.x] = low_count + high_count;
  __syncthreads();
  for (int offset = 1; offset < kChooseThreads; offset *= 2) {
    const int64_t add = threadIdx.x + offset < kChooseThreads ? suffix[threadIdx.x + offset] : 0;
    __syncthreads();
    suffix[threadIdx.x] += add;
    __syncthreads();
  }
  const int64_t above_high = suffix[threadIdx.x] - low_count - high_count;
  if (state.kept > 0) {
    if (bucket_holds(above_high, high_count, state.remaining)) {
      take_digit<key_t>(*state_ptr, pass, high, above_high, high_count);
    } else if (bucket_holds(above_high + high_count, low_count, state.remaining)) {
      take_digit<key_t>(*state_ptr, pass, low, above_high + high_count, low_count);
    }
  }
  // Every thread read its buckets before the scan's barriers: they can be cleared now.
  for (int slot = threadIdx.x; slot <= kGpuBuckets; slot += blockDim.x) histogram[slot] = 0;
}

// Ties to the k-th value per chunk, and per tensor (one atomic per chunk); only for a partial tie cut.
template <typename in_t, bool Absolute>
__global__ void tie_count_kernel(SegmentTable<in_t> table, const SelectState* state_ptr, int64_t* chunk_ties,
                                 unsigned long long* tensor_ties) {
  const SelectState state = *state_ptr;
  if (!partial_ties(state)) return;
  __shared__ unsigned int count;
  for (int64_t chunk = blockIdx.x; chunk < table.chunks(); chunk += gridDim.x) {
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    const ChunkSpan span = chunk_span(table, chunk, kSelectChunk);
    unsigned int mine = 0;
    for (int64_t j = span.begin + threadIdx.x; j < span.end; j += blockDim.x) {
      mine += is_tie(key_at<Absolute>(table.data[span.tensor], j), state);
    }
    atomicAdd(&count, mine);
    __syncthreads();
    if (threadIdx.x == 0) {
      chunk_ties[table.first_chunk + chunk] = count;
      atomicAdd(&tensor_ties[table.first_tensor + span.tensor], static_cast<unsigned long long>(count));
    }
    // Thread 0 reads `count` and resets it for the next chunk; the others add to it only after that
    // reset's barrier.
  }
}

struct Found {
  int64_t index, before;  // the position, and the running sum before it
};

// The first position i of [0, n) where the running sum of count(i) reaches `rank` (1 <= rank <= the
// total), found by the whole block a tile at a time; every thread returns it.
template <typename Count>
__device__ Found block_find_rank(int64_t n, int64_t rank, const Count& count) {
  __shared__ int64_t scan[kRowThreads];
  __shared__ Found found;
  int64_t base = 0;
  for (int64_t tile = 0; tile < n; tile += kRowThreads) {
    const int64_t i = tile + threadIdx.x;
    const int64_t mine = i < n ? count(i) : 0;
    scan[threadIdx.x] = mine;
    __syncthreads();
    for (int offset = 1; offset < kRowThreads; offset *= 2) {
      const int64_t add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    const int64_t inclusive = base + scan[threadIdx.x];
    if (mine > 0 && bucket_holds(inclusive - mine, mine, rank)) found = {i, inclusive - mine};
    const int64_t tile_total = scan[kRowThreads - 1];
    __syncthreads();
    if (base + tile_total >= rank) break;
    base += tile_total;
  }
  return found;
}

// The rows (value, cut) of this group's tensors. One block.
template <typename in_t, bool Absolute>
__global__ void rows_kernel(SegmentTable<in_t> table, const SelectState* state_ptr, const int64_t* chunk_ties,
                            const unsigned long long* tensor_ties, double* rows) {
  using key_t = KeyOf<in_t>;
  const SelectState state = *state_ptr;
  const double value = threshold_value<key_t>(state);
  if (!partial_ties(state)) {
    for (int t = threadIdx.x; t < table.count; t += blockDim.x) {
      rows[2 * (table.first_tensor + t)] = value;
      rows[2 * (table.first_tensor + t) + 1] = static_cast<double>(whole_cut(state, table.numel[t]));
    }
    return;
  }
  // Ties in the tensors of earlier groups: a block sum.
  __shared__ int64_t sums[kRowThreads];
  int64_t mine = 0;
  for (int64_t i = threadIdx.x; i < table.first_tensor; i += kRowThreads) mine += static_cast<int64_t>(tensor_ties[i]);
  sums[threadIdx.x] = mine;
  __syncthreads();
  for (int half = kRowThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  int64_t ties_before = sums[0];
  for (int t = 0; t < table.count; ++t) {
    const int64_t ties = static_cast<int64_t>(tensor_ties[table.first_tensor + t]);
    const int64_t kept = ties_kept_in(state.remaining, ties_before, ties);
    int64_t last_kept = -1;
    if (kept > 0 && kept < ties) {  // the one tensor where the cut falls: its chunk, then its element
      const int64_t first_chunk = table.first_chunk + table.chunk_begin[t];
      const Found chunk = block_find_rank(table.chunk_begin[t + 1] - table.chunk_begin[t], kept,
                                          [&](int64_t c) { return chunk_ties[first_chunk + c]; });
      const ChunkSpan span = chunk_span(table, table.chunk_begin[t] + chunk.index, kSelectChunk);
      const in_t* data = table.data[t];
      const Found element = block_find_rank(span.end - span.begin, kept - chunk.before, [&](int64_t j) {
        return static_cast<int64_t>(is_tie(key_at<Absolute>(data, span.begin + j), state));
      });
      last_kept = span.begin + element.index;
    }
    if (threadIdx.x == 0) {
      rows[2 * (table.first_tensor + t)] = value;
      rows[2 * (table.first_tensor + t) + 1] = static_cast<double>(canonical_cut(kept, ties, table.numel[t], last_kept));
    }
    ties_before += ties;
  }
}

template <typename in_t, bool Absolute>
void select_threshold(const std::vector<at::Tensor>& inputs, int64_t k, at::Tensor& out) {
  using key_t = KeyOf<in_t>;
  const auto tables = plan_tables<in_t>(inputs, kTableCapacity, kSelectChunk);
  int64_t total = 0;
  for (const auto& input : inputs) total += input.numel();
  const int64_t total_chunks = tables.back().first_chunk + tables.back().chunks();
  const auto longs = inputs[0].options().dtype(at::kLong);
  at::Tensor histogram = at::zeros({kGpuBuckets + 1}, longs);
  at::Tensor state = at::empty({static_cast<int64_t>(sizeof(SelectState) / sizeof(int64_t))}, longs);
  at::Tensor chunk_ties = at::empty({std::max<int64_t>(total_chunks, 1)}, longs);
  at::Tensor tensor_ties = at::zeros({static_cast<int64_t>(inputs.size())}, longs);
  auto* histogram_ptr = reinterpret_cast<unsigned long long*>(histogram.mutable_data_ptr<int64_t>());
  auto* state_ptr = reinterpret_cast<SelectState*>(state.mutable_data_ptr<int64_t>());
  auto* tensor_ties_ptr = reinterpret_cast<unsigned long long*>(tensor_ties.mutable_data_ptr<int64_t>());
  const int device = inputs[0].get_device();
  const Stream stream = current_stream();
  for (int pass = 0; pass < GpuDigits<key_t>::kPasses; ++pass) {
    for (const auto& table : tables) {
      if (table.chunks() == 0) continue;
      launch(histogram_kernel<in_t, Absolute>, blocks_for_chunks(table.chunks(), device), kThreads, stream, table,
             pass, state_ptr, histogram_ptr);
    }
    launch(choose_kernel<key_t>, 1, kChooseThreads, stream, histogram_ptr, state_ptr, pass, k, total);
  }
  for (const auto& table : tables) {
    if (table.chunks() == 0) continue;
    launch(tie_count_kernel<in_t, Absolute>, blocks_for_chunks(table.chunks(), device), kThreads, stream, table,
           state_ptr, chunk_ties.mutable_data_ptr<int64_t>(), tensor_ties_ptr);
  }
  for (const auto& table : tables) {
    launch(rows_kernel<in_t, Absolute>, 1, kRowThreads, stream, table, state_ptr,
           chunk_ties.const_data_ptr<int64_t>(), tensor_ties_ptr,
           out.mutable_data_ptr<double>());
  }
}

at::Tensor topk_threshold(const std::vector<at::Tensor>& block_scores, int64_t k, bool absolute) {
  const std::vector<at::Tensor> inputs =
      contiguous_score_list(block_scores, k, kKernelDevice, "topk_threshold");
  if (inputs.empty()) return at::empty({0, 2}, at::TensorOptions().dtype(at::kDouble));
  const DeviceGuard guard(inputs[0].device());
  at::Tensor out = at::empty({static_cast<int64_t>(inputs.size()), 2}, inputs[0].options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs[0].scalar_type(), "topk_threshold",
                                  [&] {
    absolute ? select_threshold<scalar_t, true>(inputs, k, out) : select_threshold<scalar_t, false>(inputs, k, out);
  });
  return out;
}

}  // namespace

BIPKERNELS_CUDA_KERNELS(m) { m.impl("topk_threshold", &topk_threshold); }

}  // namespace bipkernels::cuda
