// CPU block reduction, shared by every CPU kernel that needs a structured mask.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <ATen/core/Tensor.h>

#include "bipkernels/math.h"
#include "bipkernels/prepared_mask.h"

namespace bipkernels::cpu {

// Work size of a parallel chunk: big enough to amortise the thread hand-off.
constexpr int64_t kGrain = 32768;

// N:M decisions of [begin, end) one element at a time: element(i, kept) in order. The group position
// ((flat % cols) / inner) % M is counted along the walk, not divided out per element: it steps every
// `inner` elements and wraps at M, and a row starts at 0 again because M divides the channels. A batch of
// decisions is made before the element body sees them, so that neither loop holds the other's branches (one
// loop was 1.6× slower in hypergrad).
template <typename Rule, typename Element>
inline void for_each_nm_element(const Rule& rule, int64_t begin, int64_t end, const Element& element) {
  constexpr int64_t kBatch = 256;
  bool decisions[kBatch];
  const BlockLayout& layout = rule.layout;
  int64_t spatial = begin % layout.inner, position = layout.group_position(begin);
  for (int64_t first = begin; first < end; first += kBatch) {
    const int64_t count = std::min(kBatch, end - first);
    for (int64_t j = 0; j < count; ++j) {
      decisions[j] = rule.nm_kept_at(first + j, position);
      if (++spatial == layout.inner) {
        spatial = 0;
        if (++position == layout.b) position = 0;
      }
    }
    for (int64_t j = 0; j < count; ++j) element(first + j, decisions[j]);
  }
}

// The N:M decisions of [begin, end), the same as nm_kept_at's, made a batch of whole slabs at a time. A
// slab is the M * inner elements of one row's group of M channels; slabs tile the tensor (M divides the
// channels). An element's rivals lie m * inner after it (a larger |s| beats it) and m * inner before it
// (an equal |s| beats it too: a lower position), m = 1..M-1, as far as its slab reaches, and how far that
// is depends only on its offset in the slab. So the batch compares every element with the rivals at one
// distance at a time, each comparison masked by whether that rival is in its group: loops over contiguous
// memory that the compiler vectorises, where a scan of each element's group did not (on 512x512x3x3:
// 2:4 block_mask and masked_weight 2-3× faster, hypergrad about 2×). |s| is taken once per element into a
// buffer (half and bfloat16 scores widen in software) with `reach` elements of margin on each side, which
// only the masked-out comparisons read. The partial slabs at a chunk's ends, and slabs longer than a
// batch, are decided one by one.
template <typename Rule, typename Element>
inline void for_each_nm_decision(const Rule& rule, int64_t begin, int64_t end, const Element& element) {
  using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(rule.scores)>>;
  using score_t = decltype(rule.value);
  constexpr int64_t kBatch = 1024;
  const BlockLayout& layout = rule.layout;
  const int64_t slab = layout.b * layout.inner, reach = slab - layout.inner;
  const int64_t batch = kBatch / slab * slab;
  const int64_t batched_begin = std::min(end, ceil_div(begin, slab) * slab);
  const int64_t batched_end = batch == 0 ? batched_begin : std::max(batched_begin, end / slab * slab);
  for_each_nm_element(rule, begin, batched_begin, element);
  if (batched_begin < batched_end) {
    int32_t slab_offset[kBatch], beaten[kBatch];
    score_t margined[3 * kBatch] = {};  // reach < slab <= kBatch on each side of the batch
    score_t* magnitude = margined + reach;
    bool decisions[kBatch];
    // int32 throughout (slab <= kBatch here), so that the compared lanes are as wide as float scores.
    const int32_t kept_count = static_cast<int32_t>(layout.a), slab32 = static_cast<int32_t>(slab);
    const int32_t inner32 = static_cast<int32_t>(layout.inner);
    for (int32_t t = 0, offset = 0; t < batch; ++t) {
      slab_offset[t] = offset;
      if (++offset == slab32) offset = 0;
    }
    for (int64_t first = batched_begin, count; first < batched_end; first += count) {
      count = std::min(batch, batched_end - first);
      const scalar_t* scores = rule.scores + first;
      for (int64_t t = 0; t < count; ++t) {
        magnitude[t] = std::fabs(static_cast<score_t>(scores[t]));
        beaten[t] = 0;
      }
      for (int32_t distance = inner32; distance < slab32; distance += inner32) {
        // Summed as 0/1 masks, not branched on: random scores would mispredict half of the branches.
        for (int64_t t = 0; t < count; ++t) {
          beaten[t] += static_cast<int32_t>(slab_offset[t] < slab32 - distance) &
                       static_cast<int32_t>(magnitude[t + distance] > magnitude[t]);
        }
        for (int64_t t = 0; t < count; ++t) {
          beaten[t] += static_cast<int32_t>(slab_offset[t] >= distance) &
                       static_cast<int32_t>(magnitude[t - distance] >= magnitude[t]);
        }
      }
      for (int64_t t = 0; t < count; ++t) decisions[t] = (magnitude[t] == magnitude[t]) & (beaten[t] < kept_count);
      for (int64_t t = 0; t < count; ++t) element(first + t, decisions[t]);
    }
  }
  for_each_nm_element(rule, batched_end, end, element);
}

// Unstructured decisions of [begin, end) one element at a time: element(i, kept) in order. A batch is first
// decided by `|s| > value` alone, a loop the compiler vectorises (int32 decisions: as wide as float scores);
// only a batch holding a tie at the threshold value is decided again by the full rule, whose logical index
// and cut make the loop scalar. Then the element body runs over the batch, a second loop that vectorises
// too when the body has no branch (masked_weight's and hypergrad's bit selects). Deciding element by element
// inside the body's loop vectorised neither loop and mispredicted the selects on random signs and decisions:
// on ResNet-18's weights, 10% kept, 1 thread, masked_weight 28 -> 14 ms, hypergrad 86 -> 37 ms with signed
// scores (41 -> 37 ms with positive ones, whose signs never mispredicted).
template <typename Rule, typename Element>
inline void for_each_unstructured_element(const Rule& rule, int64_t begin, int64_t end, const Element& element) {
  using score_t = decltype(rule.value);
  constexpr int64_t kBatch = 1024;
  int32_t decisions[kBatch];
  for (int64_t first = begin; first < end; first += kBatch) {
    const int64_t count = std::min(kBatch, end - first);
    const auto* scores = rule.scores + first;
    int32_t ties = 0;
    for (int64_t t = 0; t < count; ++t) {
      const score_t score = std::fabs(static_cast<score_t>(scores[t]));
      decisions[t] = score > rule.value;
      ties += score == rule.value;
    }
    if (ties != 0) {
      for (int64_t t = 0; t < count; ++t) decisions[t] = rule.template kept<kUnstructured>(first + t);
    }
    for (int64_t t = 0; t < count; ++t) element(first + t, decisions[t] != 0);
  }
}

// Calls element(i, kept) for every i of [begin, end) in order, with i's keep decision. A structured mask
// decides once per run of its block (BlockLayout::run_from) instead of once per element, which spares the
// index arithmetic per element, and the run's loop sees one `kept` (the compiler takes a select on it out
// of the loop); unstructured and N:M elements decide alone, a batch of decisions at a time.
template <int64_t Kind, typename Rule, typename Element>
inline void for_each_decision(const Rule& rule, int64_t begin, int64_t end, const Element& element) {
  if constexpr (Kind == kUnstructured) {
    for_each_unstructured_element(rule, begin, end, element);
  } else if constexpr (Kind == kNM) {
    for_each_nm_decision(rule, begin, end, element);
  } else {
    for (int64_t first = begin; first < end;) {
      const int64_t stop = std::min(end, first + rule.layout.run_from(first));
      const bool kept = rule.template kept<Kind>(first);
      for (int64_t i = first; i < stop; ++i) element(i, kept);
      first = stop;
    }
  }
}

// Flat block scores (num_blocks,) of contiguous `scores` in the score type (float, or double for double
// scores). For unstructured and N:M, |s| itself.
at::Tensor reduce_blocks(const at::Tensor& scores, const BlockLayout& layout, int64_t p);

inline PreparedMask prepare_mask(const at::Tensor& scores, const at::Tensor& threshold, int64_t kind, int64_t a,
                                 int64_t b, int64_t p, const char* op, bool memory_order = false) {
  return bipkernels::prepare_mask(scores, threshold, kind, a, b, p, op, memory_order, reduce_blocks);
}

}  // namespace bipkernels::cpu
