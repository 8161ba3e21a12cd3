// The multi-pass GPU select of topk_threshold (csrc/cuda/topk_threshold.cu): its tables and decisions.
//
// For keys of W bits (32 for float, half and bfloat16 scores; 64 for double):
//  1. ceil(W / 11) histogram passes. Pass p counts the 11-bit digit p of every key whose higher digits
//     equal the prefix chosen so far (histogram_slot); pass 0 counts the NaN keys in an extra slot.
//     A one-block step then tests every bucket at once for the k-th largest key (bucket_holds) and
//     appends the winner's digit to the prefix (take_digit). The SelectState carries prefix and rank
//     from launch to launch on the device: nothing waits for the host, so a CUDA graph can capture it.
//  2. Only when the k-th value is tied and some but not all of its ties are kept: ties per chunk.
//  3. The rows: ties per tensor from the chunk counts, then, in the one tensor where the cut falls, the
//     chunk and inside it the element that is the last kept tie (canonical_cut).
// Tensors are split into chunks of `chunk` scores that never straddle two tensors; a CUDA block takes a
// chunk at a time. A launch sees up to kTableCapacity tensors through a by-value SegmentTable; longer
// lists take one launch per group of tensors and the histograms add up across them.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/core/Tensor.h>

#include "bipkernels/select.h"

namespace bipkernels {

constexpr int kGpuDigitBits = 11;  // 2048 buckets: a shared-memory histogram, 3 passes for float keys
constexpr int64_t kGpuBuckets = int64_t(1) << kGpuDigitBits;
constexpr int64_t kSelectChunk = 4096;
constexpr int kTableCapacity = 128;  // keeps the by-value table under the classic 4 KiB parameter limit

template <typename key_t>
using GpuDigits = Radix<key_t, kGpuDigitBits>;

// The tensors of one launch: pointers, sizes and where each one's chunks start.
template <typename in_t>
struct SegmentTable {
  const in_t* data[kTableCapacity];
  int64_t numel[kTableCapacity];
  int64_t chunk_begin[kTableCapacity + 1];  // chunks of this group before tensor i; [count] = all of them
  int count;
  int64_t first_tensor;  // index in the whole list of the group's first tensor (its output row)
  int64_t first_chunk;   // index over the whole list of the group's first chunk (tie counts)

  BIPK_HD int64_t chunks() const { return chunk_begin[count]; }

  // The tensor that holds `chunk` of this group: the last i with chunk_begin[i] <= chunk (empty tensors
  // have no chunks and are skipped by taking the last such i).
  BIPK_HD int tensor_of_chunk(int64_t chunk) const {
    int low = 0, high = count - 1;
    while (low < high) {
      const int middle = (low + high + 1) / 2;
      if (chunk_begin[middle] <= chunk) low = middle; else high = middle - 1;
    }
    return low;
  }
};

struct ChunkSpan {
  int tensor;
  int64_t begin, end;  // flat indices inside the tensor
};

template <typename in_t>
BIPK_HD ChunkSpan chunk_span(const SegmentTable<in_t>& table, int64_t chunk, int64_t chunk_size) {
  const int tensor = table.tensor_of_chunk(chunk);
  const int64_t begin = (chunk - table.chunk_begin[tensor]) * chunk_size;
  const int64_t end = begin + chunk_size < table.numel[tensor] ? begin + chunk_size : table.numel[tensor];
  return {tensor, begin, end};
}

// The groups of at most `capacity` (<= kTableCapacity) tensors, each with its chunk offsets.
template <typename in_t>
std::vector<SegmentTable<in_t>> plan_tables(const std::vector<at::Tensor>& inputs, int capacity,
                                            int64_t chunk_size) {
  std::vector<SegmentTable<in_t>> tables;
  int64_t chunks_before = 0;
  for (size_t first = 0; first < inputs.size(); first += capacity) {
    SegmentTable<in_t> table{};
    table.count = static_cast<int>(std::min<size_t>(capacity, inputs.size() - first));
    table.first_tensor = static_cast<int64_t>(first);
    table.first_chunk = chunks_before;
    for (int i = 0; i < table.count; ++i) {
      const at::Tensor& tensor = inputs[first + i];
      table.data[i] = tensor.const_data_ptr<in_t>();
      table.numel[i] = tensor.numel();
      table.chunk_begin[i + 1] = table.chunk_begin[i] + ceil_div(tensor.numel(), chunk_size);
    }
    chunks_before += table.chunks();
    tables.push_back(table);
  }
  return tables;
}

// What the passes carry from one launch to the next (device memory; 4 x 8 bytes).
struct SelectState {
  uint64_t prefix;    // the digits chosen so far; after the last pass the key of the k-th largest score
  int64_t remaining;  // rank (1-based) of the k-th largest among the keys that match the prefix
  int64_t ties;       // keys in the chosen bucket; after the last pass, the scores equal to the k-th
  int64_t kept;       // min(k, non-NaN scores); 0 keeps nothing
};

// The slot of the pass-`pass` histogram that counts `key`, or -1. NaN keys (0) are never candidates;
// pass 0 counts them in the extra slot kGpuBuckets so k can be clamped to the non-NaN scores.
template <typename key_t>
BIPK_HD int64_t histogram_slot(key_t key, key_t prefix, int pass) {
  if (key == 0) return pass == 0 ? kGpuBuckets : -1;
  return GpuDigits<key_t>::matches_prefix(key, prefix, pass) ? GpuDigits<key_t>::digit(key, pass) : -1;
}

BIPK_HD void start_select(SelectState& state, int64_t k, int64_t total, int64_t nans) {
  state.prefix = 0;
  state.kept = k < total - nans ? k : total - nans;
  state.remaining = state.kept;
  state.ties = total - nans;
}

// Appends `digit`, the bucket with `count` keys below `above` larger ones that holds the rank.
template <typename key_t>
BIPK_HD void take_digit(SelectState& state, int pass, int64_t digit, int64_t above, int64_t count) {
  state.prefix = GpuDigits<key_t>::with_digit(static_cast<key_t>(state.prefix), pass, digit);
  state.remaining -= above;
  state.ties = count;
}

// Whether the k-th value is tied and only some of its ties are kept: then the tie cut must be located.
BIPK_HD bool partial_ties(const SelectState& state) { return state.kept > 0 && state.remaining < state.ties; }

template <typename key_t>
BIPK_HD bool is_tie(key_t key, const SelectState& state) { return key == static_cast<key_t>(state.prefix); }

// The threshold value of the select: the k-th largest score, +inf when nothing is kept.
template <typename key_t>
BIPK_HD double threshold_value(const SelectState& state) {
  return state.kept == 0 ? INFINITY : value_of_key(static_cast<key_t>(state.prefix));
}

// The cut of a tensor when no tie is cut inside it: all kept, or (nothing kept) none.
BIPK_HD int64_t whole_cut(const SelectState& state, int64_t numel) { return state.kept == 0 ? 0 : numel; }

}  // namespace bipkernels
