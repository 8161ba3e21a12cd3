// CPU block reduction, shared by every CPU kernel that needs a structured mask.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "bipkernels/math.h"
#include "bipkernels/prepared_mask.h"

namespace bipkernels::cpu {

// Work size of a parallel chunk: big enough to amortise the thread hand-off.
constexpr int64_t kGrain = 32768;

// Calls body(first, stop, kept) for the runs of [begin, end) that share one keep decision: a structured
// mask decides once per run of its block (BlockLayout::run_from) instead of once per element, which
// spares the index arithmetic per element; unstructured and N:M elements decide alone.
template <int64_t Kind, typename Rule, typename Body>
inline void for_each_decision(const Rule& rule, int64_t begin, int64_t end, const Body& body) {
  if constexpr (Kind == kUnstructured) {
    for (int64_t i = begin; i < end; ++i) body(i, i + 1, rule.template kept<Kind>(i));
  } else if constexpr (Kind == kNM) {
    // The group position ((flat % cols) / inner) % M is counted along the walk, not divided out per
    // element: it steps every `inner` elements and wraps at M, and a row starts at 0 again because M
    // divides the channels. A batch of decisions is made before the body sees them, so that neither loop
    // holds the other's branches (one loop was 1.6× slower in hypergrad).
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
      for (int64_t j = 0; j < count; ++j) body(first + j, first + j + 1, decisions[j]);
    }
  } else {
    for (int64_t first = begin; first < end;) {
      const int64_t stop = std::min(end, first + rule.layout.run_from(first));
      body(first, stop, rule.template kept<Kind>(first));
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
