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

// One accumulator vector's worth (Vectorized<acc_t>::size() elements) of scalar_t, converted on the way in and
// out. For fp16/bf16 that is a half-width load/store (128 bits on AVX2), so rows whose length is a multiple of
// 8 (AVX2) or 16 (AVX512) elements never fall back to at::vec's partial (memcpy) loads and stores.
template <typename scalar_t>
inline Vectorized<at::opmath_type<scalar_t>> load_acc_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    Vectorized<float> v;
    at::vec::load_fp32_from_bf16(p, v);
    return v;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    Vectorized<float> v;
    at::vec::load_fp32_from_fp16(p, v);
    return v;
  } else {
    return Vectorized<scalar_t>::loadu(p);
  }
}

template <typename scalar_t>
inline void store_acc_vec(scalar_t* p, const Vectorized<at::opmath_type<scalar_t>>& v) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i packed = kBf16 ? at::vec::cvtfp32_bf16(__m512(v)) : at::vec::cvtfp32_fp16(__m512(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = kBf16 ? at::vec::cvtfp32_bf16(__m256(v)) : at::vec::cvtfp32_fp16(__m256(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
#else
    constexpr int64_t W = Vectorized<float>::size();
    __at_align__ float values[W];
    v.store(values);
    for (int64_t k = 0; k < W; ++k) {
      p[k] = static_cast<scalar_t>(values[k]);
    }
#endif
  } else {
    v.store(p);
  }
}

// The same for the last n < Vectorized<acc_t>::size() elements of a row (lanes past n load as zero).
template <typename scalar_t>
inline Vectorized<at::opmath_type<scalar_t>> load_acc_vec(const scalar_t* p, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  __at_align__ acc_t values[Vectorized<acc_t>::size()] = {};
  for (int64_t k = 0; k < n; ++k) {
    values[k] = static_cast<acc_t>(p[k]);
  }
  return Vectorized<acc_t>::loadu(values);
}

template <typename scalar_t>
inline void store_acc_vec(scalar_t* p, const Vectorized<at::opmath_type<scalar_t>>& v, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  __at_align__ acc_t values[Vectorized<acc_t>::size()];
  v.store(values);
  for (int64_t k = 0; k < n; ++k) {
    p[k] = static_cast<scalar_t>(values[k]);
  }
}

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
