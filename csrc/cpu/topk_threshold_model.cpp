// Host model of the CUDA topk_threshold (csrc/cuda/topk_threshold.cu): the same tables, chunks, passes,
// bucket counts and digit order, and the same gpu_select.h functions for every decision, run
// sequentially. Where the GPU adds up per-block histograms with atomics or scans counts with a block,
// the model adds and scans in order; integer sums do not depend on the order, so the model's state after
// each step is the GPU's. Registered as bipkernels::_topk_threshold_gpu_model for the tests, with the
// chunk size and group capacity as arguments so small inputs reach many chunks and groups.
#include <limits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "bipkernels/checks.h"
#include "bipkernels/gpu_select.h"

namespace bipkernels::cpu {
namespace {

template <typename in_t, bool Absolute>
void model_select(const std::vector<at::Tensor>& inputs, int64_t k, int64_t chunk, int capacity, double* rows) {
  using score_t = at::opmath_type<in_t>;
  using key_t = typename SelectKey<score_t>::type;
  const auto key_of = [](in_t value) { return select_key(ranked_score<Absolute>(static_cast<score_t>(value))); };
  const auto tables = plan_tables<in_t>(inputs, capacity, chunk);
  const int64_t total_chunks = tables.back().first_chunk + tables.back().chunks();
  int64_t total = 0;
  for (const auto& input : inputs) total += input.numel();
  // Calls visit(key, table, chunk, span, index) for every score, in the GPU's chunk order.
  auto for_each_key = [&](auto&& visit) {
    for (const auto& table : tables) {
      for (int64_t c = 0; c < table.chunks(); ++c) {
        const ChunkSpan span = chunk_span(table, c, chunk);
        for (int64_t j = span.begin; j < span.end; ++j) {
          visit(key_of(table.data[span.tensor][j]), table, c, j);
        }
      }
    }
  };

  // The histogram passes, each followed by the bucket choice.
  SelectState state{};
  std::vector<int64_t> histogram(kGpuBuckets + 1);
  for (int pass = 0; pass < GpuDigits<key_t>::kPasses; ++pass) {
    if (pass > 0 && state.kept == 0) break;
    std::fill(histogram.begin(), histogram.end(), 0);
    const key_t prefix = static_cast<key_t>(state.prefix);
    for_each_key([&](key_t key, const auto&, int64_t, int64_t) {
      const int64_t slot = histogram_slot(key, prefix, pass);
      if (slot >= 0) ++histogram[slot];
    });
    if (pass == 0) start_select(state, k, total, histogram[kGpuBuckets]);
    int64_t above = 0;
    for (int64_t digit = kGpuBuckets - 1; digit >= 0 && state.kept > 0; --digit) {
      if (bucket_holds(above, histogram[digit], state.remaining)) {
        take_digit<key_t>(state, pass, digit, above, histogram[digit]);
        break;
      }
      above += histogram[digit];
    }
  }

  // Ties per chunk, then per tensor, then the rows.
  const double value = threshold_value<key_t>(state);
  std::vector<int64_t> chunk_ties(total_chunks, 0), tensor_ties(inputs.size(), 0);
  if (partial_ties(state)) {
    for_each_key([&](key_t key, const auto& table, int64_t c, int64_t) {
      chunk_ties[table.first_chunk + c] += is_tie(key, state);
    });
  }
  int64_t ties_before = 0;
  for (const auto& table : tables) {
    for (int t = 0; t < table.count; ++t) {
      const int64_t row = table.first_tensor + t;
      if (!partial_ties(state)) {
        rows[2 * row] = value;
        rows[2 * row + 1] = static_cast<double>(whole_cut(state, table.numel[t]));
        continue;
      }
      const int64_t first = table.first_chunk + table.chunk_begin[t], last = table.first_chunk + table.chunk_begin[t + 1];
      for (int64_t c = first; c < last; ++c) tensor_ties[row] += chunk_ties[c];
      const int64_t kept = ties_kept_in(state.remaining, ties_before, tensor_ties[row]);
      int64_t last_kept = -1;
      if (kept > 0 && kept < tensor_ties[row]) {
        // The chunk where the count of ties reaches `kept`, then the element inside it.
        int64_t c = first, before = 0;
        while (before + chunk_ties[c] < kept) before += chunk_ties[c++];
        const ChunkSpan span = chunk_span(table, c - table.first_chunk, chunk);
        for (int64_t j = span.begin; before < kept; ++j) {
          before += is_tie(key_of(table.data[t][j]), state);
          last_kept = j;
        }
      }
      rows[2 * row] = value;
      rows[2 * row + 1] = static_cast<double>(canonical_cut(kept, tensor_ties[row], table.numel[t], last_kept));
      ties_before += tensor_ties[row];
    }
  }
}

at::Tensor topk_threshold_gpu_model(const std::vector<at::Tensor>& block_scores, int64_t k, int64_t chunk,
                                    int64_t capacity, bool absolute) {
  const char* op = "_topk_threshold_gpu_model";
  TORCH_CHECK(chunk >= 1, "bipkernels.", op, ": chunk must be >= 1, got ", chunk);
  TORCH_CHECK(capacity >= 1 && capacity <= kTableCapacity, "bipkernels.", op, ": capacity must be in [1, ",
              kTableCapacity, "], got ", capacity);
  const std::vector<at::Tensor> inputs = contiguous_score_list(block_scores, k, c10::DeviceType::CPU, op);
  at::Tensor out = at::empty({static_cast<int64_t>(inputs.size()), 2}, at::TensorOptions().dtype(at::kDouble));
  if (inputs.empty()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs[0].scalar_type(), "_topk_threshold_gpu_model", [&] {
    double* rows = out.mutable_data_ptr<double>();
    absolute ? model_select<scalar_t, true>(inputs, k, chunk, static_cast<int>(capacity), rows)
             : model_select<scalar_t, false>(inputs, k, chunk, static_cast<int>(capacity), rows);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bipkernels, CPU, m) { m.impl("_topk_threshold_gpu_model", &topk_threshold_gpu_model); }

}  // namespace bipkernels::cpu
