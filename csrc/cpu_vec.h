// Vector loads and stores that convert between a tensor's element type and its float accumulation type,
// for the CPU kernels (compiled once per ISA: Vectorized<float> is 8 or 16 lanes wide accordingly).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace vlfuse::cpu {

using at::vec::Vectorized;

// The widest block the kernels step by: one Vectorized<scalar_t> for fp16/bf16 (two float vectors), one
// Vectorized<acc_t> otherwise.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kAccPerBlock = kReduced ? 2 : 1;
  static constexpr int64_t kBlock = fVec::size() * kAccPerBlock;

  // Loads n <= kBlock elements into kAccPerBlock accumulator vectors (lanes past n are zero).
  static inline void load(const scalar_t* p, int64_t n, fVec* out) {
    if constexpr (kReduced) {
      auto b = n == kBlock ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      auto [a0, a1] = at::vec::convert_to_float<scalar_t>(b);
      out[0] = a0;
      out[1] = a1;
    } else {
      out[0] = n == kBlock ? fVec::loadu(p) : fVec::loadu(p, n);
    }
  }

  static inline void store(scalar_t* p, int64_t n, const fVec* v) {
    if constexpr (kReduced) {
      auto b = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
      if (n == kBlock) {
        b.store(p);
      } else {
        b.store(p, n);
      }
    } else {
      if (n == kBlock) {
        v[0].store(p);
      } else {
        v[0].store(p, n);
      }
    }
  }
};

// Loads n <= kBlock accumulator values stored contiguously (e.g. a per-token coefficient table).
template <typename acc_t, int kParts>
inline void load_acc(const acc_t* p, int64_t n, Vectorized<acc_t>* out) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  for (int j = 0; j < kParts; ++j) {
    const int64_t m = n - j * W;
    out[j] = m >= W ? Vectorized<acc_t>::loadu(p + j * W)
                    : (m > 0 ? Vectorized<acc_t>::loadu(p + j * W, m) : Vectorized<acc_t>(acc_t(0)));
  }
}

}  // namespace vlfuse::cpu
