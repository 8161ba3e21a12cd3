// Digit logic of the exact top-k radix select (bipkernels.ops.topk_threshold), shared by the CPU
// kernel and the CUDA kernel, so both walk the same keys and digits.
//
// Scores are mapped to unsigned keys whose order is the order of the values (key_of_bits). The key is
// consumed from its most significant end, one digit a pass: a histogram of the current digit over the
// elements whose higher digits match the prefix found so far, then the bucket that holds the k-th
// largest key. After all passes the prefix is the exact key of the k-th largest score, and `remaining`
// says how many of the scores equal to it are kept; the per-tensor tie cut follows (canonical_cut).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bipkernels/math.h"

namespace bipkernels {

// Key type per score type: 32 bits for float (half and bfloat16 scores are widened to float first),
// 64 bits for double.
template <typename score_t> struct SelectKey { using type = uint32_t; using value = float; };
template <> struct SelectKey<double> { using type = uint64_t; using value = double; };

BIPK_HD uint32_t bits_of(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

BIPK_HD uint64_t bits_of(double value) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(value));
#else
  uint64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// Order-preserving key of a value's bits: positives get the sign bit set, negatives all bits flipped;
// -0.0 folds onto +0.0, and NaN maps to key 0, which no other value has (it is the key of the all-ones
// bit pattern, itself a NaN), so the top-digit bucket 0 counts exactly the NaN scores. Integer-only and
// branch-free, so the histogram loops stay cheap.
template <typename key_t>
BIPK_HD key_t key_of_bits(key_t bits) {
  constexpr int width = sizeof(key_t) * 8;
  constexpr key_t sign = key_t(1) << (width - 1);
  constexpr key_t infinity = sizeof(key_t) == 4 ? key_t(0x7f800000u) : key_t(0x7ff0000000000000ull);
  const key_t magnitude = bits & ~sign;
  const key_t flip = (bits & sign) ? key_t(~key_t(0)) : sign;
  const key_t key = magnitude == 0 ? sign : key_t(bits ^ flip);
  return magnitude > infinity ? key_t(0) : key;
}

template <typename value_t>
BIPK_HD auto select_key(value_t value) -> decltype(bits_of(value)) {
  return key_of_bits(bits_of(value));
}

// The score a select ranks: the value itself, or its magnitude when the select takes the unstructured
// block scores |s| straight from the scores (which saves writing |s| out and reading it back). NaN stays
// NaN, and -0.0 needs no care: its key is that of +0.0.
template <bool Absolute, typename score_t>
BIPK_HD score_t ranked_score(score_t value) {
  if constexpr (!Absolute) return value;
#if defined(__CUDA_ARCH__)
  return fabs(value);  // a sign-bit clear, not a branch: half of the signed scores are negative
#else
  return std::fabs(value);
#endif
}

template <typename key_t>
BIPK_HD double value_of_key(key_t key) {
  constexpr key_t sign = key_t(1) << (sizeof(key_t) * 8 - 1);
  const key_t bits = (key & sign) ? key_t(key & ~sign) : key_t(~key);
  if (sizeof(key_t) == 4) {
    float value;
    const uint32_t narrow = static_cast<uint32_t>(bits);
    std::memcpy(&value, &narrow, sizeof(value));
    return value;
  }
  double value;
  const uint64_t wide = static_cast<uint64_t>(bits);
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// Digits of Bits bits consumed from the most significant end of a key_t: the CPU kernel uses 16-bit
// digits (it gathers candidates after the first pass), the GPU select 11-bit ones (its histograms live
// in shared memory and every pass rereads the data). When Bits does not divide the key width, the last
// digit is the narrower remainder.
template <typename key_t, int Bits>
struct Radix {
  static constexpr int kWidth = static_cast<int>(sizeof(key_t) * 8);
  static constexpr int kPasses = (kWidth + Bits - 1) / Bits;
  static constexpr int64_t kBuckets = int64_t(1) << Bits;

  // Position of the lowest bit of the digit of `pass` (pass 0 is the most significant).
  BIPK_HD static int shift(int pass) { return kWidth - Bits * (pass + 1) > 0 ? kWidth - Bits * (pass + 1) : 0; }

  BIPK_HD static int64_t digit(key_t key, int pass) {
    const int width = kWidth - Bits * pass < Bits ? kWidth - Bits * pass : Bits;
    return static_cast<int64_t>((key >> shift(pass)) & ((key_t(1) << width) - 1));
  }

  // Whether the digits of `key` before `pass` equal those of `prefix`.
  BIPK_HD static bool matches_prefix(key_t key, key_t prefix, int pass) {
    return pass == 0 || (key >> shift(pass - 1)) == (prefix >> shift(pass - 1));
  }

  BIPK_HD static key_t with_digit(key_t prefix, int pass, int64_t digit) {
    return prefix | (static_cast<key_t>(digit) << shift(pass));
  }
};

// Whether the bucket with `count` keys, below `above` larger keys, holds the `remaining`-th largest key
// (1-based). Exactly one bucket of a histogram does when 1 <= remaining <= its total, so a GPU can test
// every bucket in parallel and reach the choice choose_bucket makes walking down.
BIPK_HD bool bucket_holds(int64_t above, int64_t count, int64_t remaining) {
  return above < remaining && remaining <= above + count;
}

// Choose the bucket of this pass that holds the `remaining`-th largest key among the candidates,
// walking the histogram from the largest digit down. On return `remaining` counts the keys still to
// take inside the chosen bucket. Requires 1 <= remaining <= sum(histogram).
struct BucketChoice {
  int64_t digit, remaining, bucket_count;
};

BIPK_HD BucketChoice choose_bucket(const int64_t* histogram, int64_t buckets, int64_t remaining) {
  int64_t above = 0;
  for (int64_t digit = buckets - 1; digit > 0; --digit) {
    if (bucket_holds(above, histogram[digit], remaining)) return {digit, remaining - above, histogram[digit]};
    above += histogram[digit];
  }
  return {0, remaining - above, histogram[0]};
}

// Scores kept among the `ties` equal to the threshold value in one tensor, when `remaining` ties are
// kept over the whole list and `ties_before` of them lie in earlier tensors (lowest global index first).
BIPK_HD int64_t ties_kept_in(int64_t remaining, int64_t ties_before, int64_t ties) {
  const int64_t left = remaining - ties_before;
  return left < 0 ? 0 : (left > ties ? ties : left);
}

// The canonical cut of a tensor with `numel` scores (math.h): numel when all of its ties are kept (or it
// has none), 0 when none are, else one past the flat index of its last kept tie.
BIPK_HD int64_t canonical_cut(int64_t kept, int64_t ties, int64_t numel, int64_t last_kept_index) {
  if (kept == ties) return numel;
  return kept == 0 ? 0 : last_kept_index + 1;
}

}  // namespace bipkernels
