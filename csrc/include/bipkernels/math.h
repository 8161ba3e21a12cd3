// The per-element and per-block arithmetic and decisions of every bipkernels kernel, written once.
//
// Everything here is `__host__ __device__` when compiled by nvcc and plain inline C++ otherwise, so the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) call the very same functions: the CPU tests,
// which compare the CPU kernels with the float64 reference, therefore test the CUDA arithmetic too.
//
// Conventions (the contract of bipkernels/reference.py):
// - A weight of shape (out, in, *kernel) is viewed as a matrix (rows, cols) = (out, in * inner) with
//   inner = prod(kernel) (1 for a Linear weight, and for 1-D tensors rows = numel, cols = 1).
// - A block score reduces |s| over the block in double precision, in the canonical order of
//   BlockLayout::element (increasing flat index), and is rounded once to the score type.
// - A threshold is the pair (value, cut): block i (flat block index) is kept iff its score is not NaN
//   and (score > value, or score == value and i < cut). The cut carries the tie rule "lowest global
//   flat index first"; keep-all is (-inf, +inf) and keep-none is (+inf, 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define BIPK_HD __host__ __device__ __forceinline__
#else
#define BIPK_HD inline
#endif

namespace bipkernels {

// Numbering shared with bipkernels/structures.py (Structure.kind_id).
enum StructureKind : int64_t {
  kUnstructured = 0,
  kFilter = 1,
  kChannel = 2,
  kNM = 3,  // a = N kept in every group of b = M consecutive input channels
  kTile = 4,  // a x b tiles of the (rows, cols) matrix; edge tiles may be smaller
};

// Implicit-term forms of the hypergradient (bipkernels.ops.IMPLICIT_FORMS).
enum ImplicitForm : int64_t {
  kImplicitPaper = 0,     // -(1/gamma) * m * g * g
  kImplicitReleased = 1,  // -(1/gamma) * (theta * g)^2, the released code's G1 * G2
};

BIPK_HD int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // no a + b overflow

// Which elements form which block. For N:M the "blocks" are the groups of M; their scores are not
// reduced (each element keeps |s|), the group only decides which N survive.
struct BlockLayout {
  int64_t kind, a, b;
  int64_t rows, cols, inner, channels;  // cols = channels * inner

  BIPK_HD int64_t in_channels() const { return channels; }
  BIPK_HD int64_t tile_cols() const { return ceil_div(cols, b); }

  // Number of blocks (groups for N:M); the length of the flattened block-score tensor except for N:M.
  BIPK_HD int64_t num_blocks() const {
    switch (kind) {
      case kFilter: return rows;
      case kChannel: return in_channels();
      case kNM: return rows * (in_channels() / b) * inner;
      case kTile: return ceil_div(rows, a) * tile_cols();
      default: return rows * cols;
    }
  }

  BIPK_HD int64_t block_of(int64_t flat) const {
    switch (kind) {
      case kFilter: return flat / cols;
      case kChannel: return (flat % cols) / inner;
      case kNM: {
        const int64_t row = flat / cols, rem = flat % cols;
        const int64_t channel = rem / inner, spatial = rem % inner;
        return (row * (in_channels() / b) + channel / b) * inner + spatial;
      }
      case kTile: return (flat / cols / a) * tile_cols() + (flat % cols) / b;
      default: return flat;
    }
  }

  BIPK_HD int64_t block_size(int64_t block) const {
    switch (kind) {
      case kFilter: return cols;
      case kChannel: return rows * inner;
      case kNM: return b;
      case kTile: {
        const int64_t tile_row = block / tile_cols(), tile_col = block % tile_cols();
        const int64_t height = rows - tile_row * a < a ? rows - tile_row * a : a;
        const int64_t width = cols - tile_col * b < b ? cols - tile_col * b : b;
        return height * width;
      }
      default: return 1;
    }
  }

  // Flat index of the j-th element of a block, increasing with j (the canonical reduction order).
  BIPK_HD int64_t element(int64_t block, int64_t j) const {
    switch (kind) {
      case kFilter: return block * cols + j;
      case kChannel: return (j / inner) * cols + block * inner + j % inner;
      case kNM: {
        const int64_t spatial = block % inner, group_row = block / inner;
        const int64_t groups_per_row = in_channels() / b;
        const int64_t row = group_row / groups_per_row, group = group_row % groups_per_row;
        return row * cols + (group * b + j) * inner + spatial;
      }
      case kTile: {
        const int64_t tile_row = block / tile_cols(), tile_col = block % tile_cols();
        const int64_t width = cols - tile_col * b < b ? cols - tile_col * b : b;
        return (tile_row * a + j / width) * cols + tile_col * b + j % width;
      }
      default: return block;
    }
  }

  // Calls visit(flat) for every element of `block` in the order of element(block, 0), element(block, 1),
  // ...: the same canonical order (so the same sums), with rows of a block walked without a division per
  // element.
  template <typename Visit>
  BIPK_HD void for_each_element(int64_t block, const Visit& visit) const {
    // The block as `height` rows of `width` elements in the (rows, cols) view.
    int64_t first_row = 0, height = rows, first_col = 0, width = cols;
    switch (kind) {
      case kFilter:
        first_row = block;
        height = 1;
        break;
      case kChannel:
        first_col = block * inner;
        width = inner;
        break;
      case kTile:
        first_row = block / tile_cols() * a;
        first_col = block % tile_cols() * b;
        height = rows - first_row < a ? rows - first_row : a;
        width = cols - first_col < b ? cols - first_col : b;
        break;
      default:
        for (int64_t j = 0; j < block_size(block); ++j) visit(element(block, j));
        return;
    }
    for (int64_t row = first_row; row < first_row + height; ++row) {
      for (int64_t flat = row * cols + first_col, end = flat + width; flat < end; ++flat) visit(flat);
    }
  }

  // How many elements from `flat` on lie in flat's block without a break: filter rows, runs of one
  // channel's kernel window, tile rows. The CPU kernels decide such a run once. 1 for unstructured and
  // N:M, whose elements decide alone.
  BIPK_HD int64_t run_from(int64_t flat) const {
    switch (kind) {
      case kFilter: return cols - flat % cols;
      case kChannel: return inner - flat % inner;
      case kTile: {
        const int64_t col = flat % cols, tile_end = (col / b + 1) * b;
        return (tile_end < cols ? tile_end : cols) - col;
      }
      default: return 1;
    }
  }

  // Position of an element inside its N:M group (0..M-1).
  BIPK_HD int64_t group_position(int64_t flat) const { return ((flat % cols) / inner) % b; }
};

// Reduction of |s| over one block: p = 1 sums |s|, p = 2 sums s² (the squared Euclidean norm: the same
// ranking as the norm, and no square root, whose rounding differs between libraries). Accumulates in
// double so the result does not depend on the order of summation for any block of practical size.
template <typename scalar_t>
BIPK_HD double block_term(scalar_t score, int64_t p) {
  const double magnitude = fabs(static_cast<double>(score));
  return p == 2 ? magnitude * magnitude : magnitude;
}

template <typename scalar_t>
BIPK_HD double block_score(const scalar_t* scores, const BlockLayout& layout, int64_t block, int64_t p) {
  double sum = 0.0;
  layout.for_each_element(block, [&](int64_t flat) { sum += block_term(scores[flat], p); });
  return sum;
}

// The keep decision of block `index` under threshold (value, cut). `value` came from scores of type
// score_t, so it converts to score_t exactly; `cut` is an integer below 2^53 or +inf.
template <typename score_t>
BIPK_HD bool is_kept(score_t score, score_t value, double cut, int64_t index) {
  return score > value || (score == value && static_cast<double>(index) < cut);
}

// N:M decision: the element at `flat` is kept iff it is not NaN and fewer than N members of its group
// beat it (a larger |s|, or an equal |s| at a lower position). NaN members never beat anyone.
// `position` is layout.group_position(flat), which a caller walking the elements in order can count
// instead of dividing it out.
template <typename score_t, typename scalar_t>
BIPK_HD bool nm_kept_at(const scalar_t* scores, const BlockLayout& layout, int64_t flat, int64_t position) {
  const score_t mine = fabs(static_cast<score_t>(scores[flat]));
  if (mine != mine) return false;
  // The group's members lie `inner` apart (element(group, j)), the first `position` strides back.
  const int64_t first = flat - position * layout.inner;
  int64_t beaten_by = 0;
  for (int64_t j = 0; j < layout.b; ++j) {
    const score_t other = fabs(static_cast<score_t>(scores[first + j * layout.inner]));
    // Two exclusive conditions summed, not joined by ||: a branch on random scores mispredicts half the
    // time (the CPU kernels were 3× slower with it).
    beaten_by += static_cast<int64_t>(other > mine) + static_cast<int64_t>((other == mine) & (j < position));
  }
  return beaten_by < layout.a;
}

template <typename score_t, typename scalar_t>
BIPK_HD bool nm_kept(const scalar_t* scores, const BlockLayout& layout, int64_t flat) {
  return nm_kept_at<score_t>(scores, layout, flat, layout.group_position(flat));
}

// The flat index in logical (row-major) order of the element at an offset in memory order, for a dense
// tensor whose strides are a permutation of the contiguous ones (channels_last and the like): the tie
// rule ranks tied scores by logical index. Holds the dims of size > 1 (a size-1 dim adds nothing); with
// none (`dims == 0`, the contiguous case) the offset is the index.
struct MemoryOrder {
  static constexpr int kMaxDims = 8;
  int dims = 0;
  int64_t size[kMaxDims] = {}, stride[kMaxDims] = {};

  BIPK_HD int64_t logical(int64_t offset) const {
    if (dims == 0) return offset;
    int64_t flat = 0;
    for (int d = 0; d < dims; ++d) flat = flat * size[d] + (offset / stride[d]) % size[d];
    return flat;
  }
};

// The mask of one element under any structure. `block_scores` holds the block scores of the tensor for
// filter, channel and tile (block_score of every block, computed beforehand) and is unused otherwise.
// `threshold` points at (value, cut) in the memory of the device that runs the kernel; loaded() reads
// it once (on the GPU: once per thread, at the start of the kernel) into `value` and `cut`.
template <typename scalar_t, typename score_t>
struct MaskRule {
  const scalar_t* scores;
  const score_t* block_scores;
  const double* threshold;
  BlockLayout layout;
  MemoryOrder order;  // unstructured only: where the elements lie (checks.h: runs_in_memory_order)
  score_t value = 0;
  double cut = 0;

  BIPK_HD MaskRule loaded() const {
    MaskRule rule = *this;
    if (layout.kind != kNM) {
      rule.value = static_cast<score_t>(threshold[0]);
      rule.cut = threshold[1];
    }
    return rule;
  }

  // Kind is the structure kind as a compile-time constant (see with_kind), so the decision inlines
  // into a branch-free loop for the unstructured case.
  template <int64_t Kind>
  BIPK_HD bool kept(int64_t flat) const {
    if constexpr (Kind == kUnstructured) {
      const score_t score = fabs(static_cast<score_t>(scores[flat]));
      // The logical index only matters for a tie at the threshold, so only a tie pays for it.
      return score > value || (score == value && static_cast<double>(order.logical(flat)) < cut);
    } else if constexpr (Kind == kNM) {
      return nm_kept<score_t>(scores, layout, flat);
    } else {
      const int64_t block = layout.block_of(flat);
      return is_kept<score_t>(block_scores[block], value, cut, block);
    }
  }

  // kept<kNM>(flat) for a caller that knows flat's group position (layout.group_position(flat)).
  BIPK_HD bool nm_kept_at(int64_t flat, int64_t position) const {
    return bipkernels::nm_kept_at<score_t>(scores, layout, flat, position);
  }
};

BIPK_HD bool needs_block_scores(int64_t kind) { return kind == kFilter || kind == kChannel || kind == kTile; }

// Calls body(std::integral_constant<int64_t, kind>{}) so kernels are instantiated per structure kind.
template <typename Body>
inline void with_kind(int64_t kind, const Body& body) {
  switch (kind) {
    case kUnstructured: return body(std::integral_constant<int64_t, kUnstructured>{});
    case kFilter: return body(std::integral_constant<int64_t, kFilter>{});
    case kChannel: return body(std::integral_constant<int64_t, kChannel>{});
    case kNM: return body(std::integral_constant<int64_t, kNM>{});
    default: return body(std::integral_constant<int64_t, kTile>{});
  }
}

// The fused backward of z = m ⊙ θ for one element, in the accumulation type acc_t:
//   grad_theta = m ⊙ g                            (a select: g may be inf/NaN where pruned)
//   grad_m     = θ ⊙ g − inv_gamma · implicit
//   grad_score = sign(s) ⊙ grad_m                 (straight-through through the ranking of |s|)
// with implicit = m ⊙ g ⊙ g (paper) or (θ ⊙ g)² (released code). sign(s) is -1 for s < 0 and +1
// otherwise (0, -0.0 and NaN included): a step then moves |s|, which the mask ranks, the way the loss
// asks, as autograd through |s| does in the released code; scores that start as |θ| keep grad_m.
template <typename acc_t>
struct HypergradElement {
  acc_t grad_theta, grad_score;
};

// The bits of a 2-, 4- or 8-byte value, to select or flip without a branch.
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

// `kept ? value : +0` without a branch: the value's bits ANDed with all ones or all zeros. Compilers turn
// the plain select into a jump, which mispredicts on irregular decisions (N:M's, one element at a time).
template <typename T>
BIPK_HD T kept_or_zero(bool kept, T value) {
  using Bits = BitsOf<T>;
  static_assert(sizeof(T) == sizeof(Bits));
  Bits bits;
  memcpy(&bits, &value, sizeof(T));
  bits &= Bits(0) - Bits(kept);
  memcpy(&value, &bits, sizeof(T));
  return value;
}

// `negative ? -value : value` without a branch: the sign bit flipped by an XOR (NaN's too, as negation).
template <typename T>
BIPK_HD T negated_if(bool negative, T value) {
  using Bits = BitsOf<T>;
  Bits bits;
  memcpy(&bits, &value, sizeof(T));
  bits ^= Bits(negative) << (sizeof(T) * 8 - 1);
  memcpy(&value, &bits, sizeof(T));
  return value;
}

// BranchFree: the same values by kept_or_zero and negated_if, for callers whose `kept` changes from one
// element to the next (the CPU N:M walk: 2:4 hypergrad 14.1 -> 11.3 ms on a 512x512x3x3 weight; the CPU
// unstructured walk, where they also let the loop vectorise: see cpu/block_scores.h). Elsewhere the plain
// selects are faster (runs of one decision, and the CUDA kernels).
template <typename acc_t, bool BranchFree = false>
BIPK_HD HypergradElement<acc_t> hypergrad_element(
    acc_t grad, acc_t theta, bool kept, bool negative_score, acc_t inv_gamma, int64_t implicit) {
  const acc_t direct = theta * grad;
  acc_t implicit_term;
  if (implicit == kImplicitReleased) {
    implicit_term = direct * direct;
  } else if constexpr (BranchFree) {
    implicit_term = kept_or_zero(kept, grad * grad);
  } else {
    implicit_term = kept ? grad * grad : acc_t(0);
  }
  // inv_gamma 0 is the plain straight-through gradient, even where g * g overflows (0 * inf is NaN).
  const acc_t grad_mask = inv_gamma == acc_t(0) ? direct : direct - inv_gamma * implicit_term;
  if constexpr (BranchFree) return {kept_or_zero(kept, grad), negated_if(negative_score, grad_mask)};
  return {kept ? grad : acc_t(0), negative_score ? -grad_mask : grad_mask};
}

}  // namespace bipkernels
