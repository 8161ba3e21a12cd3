// CPU kernel of bipkernels::topk_threshold: the exact k-th largest score over many tensors (no
// concatenated copy) by a most-significant-digit radix select (select.h), and the per-tensor tie cut.
//
// Reads of the data: one histogram of the top 16-bit digit (threads keep private histograms); one pass
// that gathers the keys of the chosen bucket (the later digits are resolved on those alone); and one
// counting pass only when the k-th value is tied and not all of its ties are kept. Extra memory: the
// gathered keys, a small fraction of the scores unless most of them share their top 16 bits.
// The result rows are (value, cut) per tensor, see math.h.
#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "bipkernels/checks.h"
#include "bipkernels/select.h"

namespace bipkernels::cpu {
namespace {

constexpr int64_t kSelectGrain = int64_t(1) << 16;
constexpr int kDigitBits = 16;  // with 16-bit digits the top-digit bucket 0 holds exactly the NaN keys
// Private histograms count in 32 bits and are flushed at least this often.
constexpr int64_t kFlushEvery = int64_t(1) << 30;

// The tensors of the list seen as one range [0, total) without copying them.
template <typename in_t>
struct Segments {
  std::vector<const in_t*> data;
  std::vector<int64_t> offsets;  // offsets[i] = first global index of tensor i; offsets.back() = total

  int64_t total() const { return offsets.back(); }
  int64_t numel(size_t i) const { return offsets[i + 1] - offsets[i]; }

  // Calls visit(tensor, pointer, local_begin, local_end) for the parts of [begin, end) in each tensor.
  template <typename Visit>
  void for_range(int64_t begin, int64_t end, const Visit& visit) const {
    size_t tensor = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[tensor + 1]);
      visit(tensor, data[tensor], begin - offsets[tensor], stop - offsets[tensor]);
      begin = stop;
      ++tensor;
    }
  }
};

template <typename in_t, bool Absolute>
void select_threshold(const std::vector<at::Tensor>& inputs, int64_t k, at::Tensor& out) {
  using score_t = at::opmath_type<in_t>;
  using key_t = typename SelectKey<score_t>::type;
  using Digits = Radix<key_t, kDigitBits>;
  const auto score_of = [](in_t value) { return ranked_score<Absolute>(static_cast<score_t>(value)); };
  constexpr int64_t kDigitBuckets = Digits::kBuckets;
  const size_t count = inputs.size();
  Segments<in_t> segments;
  segments.offsets.push_back(0);
  for (const auto& input : inputs) {
    segments.data.push_back(input.const_data_ptr<in_t>());
    segments.offsets.push_back(segments.offsets.back() + input.numel());
  }
  double* rows = out.mutable_data_ptr<double>();
  auto write_rows = [&](double value, auto&& cut_of) {
    for (size_t i = 0; i < count; ++i) {
      rows[2 * i] = value;
      rows[2 * i + 1] = static_cast<double>(cut_of(i));
    }
  };
  std::mutex merge;

  // Pass 1: histogram of the top digit of every key; bucket 0 holds the NaN scores.
  std::vector<int64_t> histogram(kDigitBuckets, 0);
  at::parallel_for(0, segments.total(), kSelectGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local(kDigitBuckets);
    for (int64_t from = begin; from < end; from += kFlushEvery) {
      std::fill(local.begin(), local.end(), 0);
      segments.for_range(from, std::min(end, from + kFlushEvery), [&](size_t, const in_t* data, int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) ++local[Digits::digit(select_key(score_of(data[j])), 0)];
      });
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t d = 0; d < kDigitBuckets; ++d) histogram[d] += local[d];
    }
  });
  const int64_t nans = histogram[0];
  histogram[0] = 0;
  const int64_t kept = std::min(k, segments.total() - nans);
  if (kept == 0) {
    write_rows(std::numeric_limits<double>::infinity(), [](size_t) { return int64_t(0); });
    return;
  }
  BucketChoice choice = choose_bucket(histogram.data(), kDigitBuckets, kept);
  key_t prefix = Digits::with_digit(key_t(0), 0, choice.digit);

  // Pass 2: gather the keys of the chosen bucket; the remaining digits are chosen among them.
  if (Digits::kPasses > 1) {
    std::vector<key_t> candidates;
    candidates.reserve(choice.bucket_count);
    at::parallel_for(0, segments.total(), kSelectGrain, [&](int64_t begin, int64_t end) {
      std::vector<key_t> local;
      segments.for_range(begin, end, [&](size_t, const in_t* data, int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) {
          const key_t key = select_key(score_of(data[j]));
          if (Digits::digit(key, 0) == choice.digit) local.push_back(key);
        }
      });
      std::lock_guard<std::mutex> lock(merge);
      candidates.insert(candidates.end(), local.begin(), local.end());
    });
    for (int pass = 1; pass < Digits::kPasses; ++pass) {
      std::fill(histogram.begin(), histogram.end(), 0);
      for (const key_t key : candidates) ++histogram[Digits::digit(key, pass)];
      choice = choose_bucket(histogram.data(), kDigitBuckets, choice.remaining);
      prefix = Digits::with_digit(prefix, pass, choice.digit);
      const auto outside = std::remove_if(candidates.begin(), candidates.end(),
                                          [&](key_t key) { return !Digits::matches_prefix(key, prefix, pass + 1); });
      candidates.erase(outside, candidates.end());
    }
  }
  const double value = value_of_key(prefix);
  const int64_t remaining = choice.remaining;
  if (remaining == choice.bucket_count) {  // every score equal to the k-th is kept
    write_rows(value, [&](size_t i) { return segments.numel(i); });
    return;
  }

  // Ties per tensor, then the cut inside the tensor where only some of them are kept.
  const score_t tie_value = static_cast<score_t>(value);
  std::vector<int64_t> ties_in(count, 0);
  at::parallel_for(0, segments.total(), kSelectGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local(count, 0);
    segments.for_range(begin, end, [&](size_t tensor, const in_t* data, int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) local[tensor] += score_of(data[j]) == tie_value;
    });
    std::lock_guard<std::mutex> lock(merge);
    for (size_t i = 0; i < count; ++i) ties_in[i] += local[i];
  });
  int64_t ties_before = 0;
  write_rows(value, [&](size_t i) {
    const int64_t kept_here = ties_kept_in(remaining, ties_before, ties_in[i]);
    ties_before += ties_in[i];
    int64_t last_kept = -1;  // flat index of the kept_here-th tie, needed only for a partial cut
    if (kept_here > 0 && kept_here < ties_in[i]) {
      const in_t* data = segments.data[i];
      for (int64_t seen = 0; seen < kept_here;) seen += score_of(data[++last_kept]) == tie_value;
    }
    return canonical_cut(kept_here, ties_in[i], segments.numel(i), last_kept);
  });
}

at::Tensor topk_threshold(const std::vector<at::Tensor>& block_scores, int64_t k, bool absolute) {
  const std::vector<at::Tensor> inputs =
      contiguous_score_list(block_scores, k, c10::DeviceType::CPU, "topk_threshold");
  at::Tensor out = at::empty({static_cast<int64_t>(inputs.size()), 2}, at::TensorOptions().dtype(at::kDouble));
  if (inputs.empty()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs[0].scalar_type(), "topk_threshold",
                                  [&] {
    absolute ? select_threshold<scalar_t, true>(inputs, k, out) : select_threshold<scalar_t, false>(inputs, k, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bipkernels, CPU, m) { m.impl("topk_threshold", &topk_threshold); }

}  // namespace bipkernels::cpu
