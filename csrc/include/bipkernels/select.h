// Digit logic of the exact top-k radix select (bipkernels.ops.topk_threshold), shared by the CPU
// kernel and the GPU select so both walk the same passes, digits and buckets.
//
// Scores are mapped to unsigned keys whose order is the order of the values (key_of_bits). The key is consumed from its most significant end, kDigitBits bits a
// pass: a histogram of the current digit over the elements whose higher digits match the prefix found
// so far, then the bucket that holds the k-th largest key. Only the first pass reads all the data: the
// keys of the chosen top-digit bucket are gathered, and the later passes run over them alone. After all passes the prefix is the exact key
// of the k-th largest score, and `remaining` says how many of the scores equal to it are kept.
#pragma once

#include <cstdint>
#include <cstring>

#include "bipkernels/math.h"

namespace bipkernels {

constexpr int kDigitBits = 16;
constexpr int64_t kDigitBuckets = int64_t(1) << kDigitBits;

// Key type per score type: 32 bits for float (half and bfloat16 scores are widened to float first),
// 64 bits for double.
template <typename score_t> struct SelectKey { using type = uint32_t; using value = float; };
template <> struct SelectKey<double> { using type = uint64_t; using value = double; };

template <typename key_t>
BIPK_HD int select_passes() { return static_cast<int>(sizeof(key_t) * 8 / kDigitBits); }

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

// The digit of `key` consumed by `pass` (pass 0 is the most significant).
template <typename key_t>
BIPK_HD int64_t key_digit(key_t key, int pass) {
  const int shift = static_cast<int>(sizeof(key_t) * 8) - kDigitBits * (pass + 1);
  return static_cast<int64_t>((key >> shift) & key_t(kDigitBuckets - 1));
}

// Whether the digits of `key` before `pass` equal those of `prefix`.
template <typename key_t>
BIPK_HD bool key_matches_prefix(key_t key, key_t prefix, int pass) {
  if (pass == 0) return true;
  const int shift = static_cast<int>(sizeof(key_t) * 8) - kDigitBits * pass;
  return (key >> shift) == (prefix >> shift);
}

template <typename key_t>
BIPK_HD key_t with_digit(key_t prefix, int pass, int64_t digit) {
  const int shift = static_cast<int>(sizeof(key_t) * 8) - kDigitBits * (pass + 1);
  return prefix | (static_cast<key_t>(digit) << shift);
}

// Choose the bucket of this pass that holds the `remaining`-th largest key (1-based) among the
// candidates, walking the histogram from the largest digit down. On return `remaining` counts the
// keys still to take inside the chosen bucket. Requires 1 <= remaining <= sum(histogram).
struct BucketChoice {
  int64_t digit, remaining, bucket_count;
};

BIPK_HD BucketChoice choose_bucket(const int64_t* histogram, int64_t remaining) {
  for (int64_t digit = kDigitBuckets - 1; digit > 0; --digit) {
    if (histogram[digit] >= remaining) return {digit, remaining, histogram[digit]};
    remaining -= histogram[digit];
  }
  return {0, remaining, histogram[0]};
}

}  // namespace bipkernels
