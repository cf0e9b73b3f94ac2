// Vector loads and stores that convert between a tensor's element type and its float accumulation type,
// for the CPU kernels (compiled once per ISA: Vectorized<float> is 8 or 16 lanes wide accordingly).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#if defined(__unix__)
#include <unistd.h>
#endif

namespace vlfuse::cpu {

using at::vec::Vectorized;

// Whether a kernel that reads and writes `bytes` in all should write its outputs with non-temporal (streaming)
// stores. A plain store first reads the line it writes (write-allocate), so an op whose data does not fit in the
// last-level cache moves its outputs over the memory bus twice; a streaming store writes whole lines without
// reading them, at the price of not leaving them in cache, which data this large would not stay in anyway.
// Just past the cache's size, part of a repeated call's data still hits in it (replacement is not pure LRU), so
// the switch is at 1.25x (the measurements behind it: benchmarks/results/design-measurements.md).
inline bool prefer_streaming_stores(int64_t bytes) {
  static const int64_t last_level_cache = [] {
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long size = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (size > 0) {
      return static_cast<int64_t>(size);
    }
#endif
    return int64_t(32) << 20;
  }();
  return bytes >= last_level_cache + last_level_cache / 4;
}

// The same choice for a kernel whose threads each write whole cache lines of one or a few output streams, every
// byte once (merge2x2), run by `threads` threads. An Intel Xeon's last-level cache is the socket's mesh L3, which
// a VM shares with every other tenant on the socket, and past its cores' private L2 it gave such a kernel little
// over memory, so there the switch is where a thread's share of the bytes passes 1.25x its L2. Elsewhere the
// last-level rule above holds: AMD EPYC's L3 belongs to one core complex, and data it holds is copied far faster
// than streaming stores reach memory (measurements: benchmarks/results/design-measurements.md).
inline bool prefer_streaming_stores(int64_t bytes, int64_t threads) {
  static const int64_t private_cache = [] {
#if defined(__x86_64__) && defined(_SC_LEVEL2_CACHE_SIZE)
    __builtin_cpu_init();
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (__builtin_cpu_is("intel") && size > 0) {
      return static_cast<int64_t>(size);
    }
#endif
    return int64_t(0);
  }();
  if (private_cache > 0 && bytes >= std::max<int64_t>(threads, 1) * (private_cache + private_cache / 4)) {
    return true;
  }
  return prefer_streaming_stores(bytes);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Streaming stores of one register at a 16-byte-aligned p, in the widest pieces p's alignment allows: a row whose
// stores are only 16- or 32-byte aligned (a head of 40 floats starts 160 bytes into its row) still has every line
// written streaming, never half streaming and half through the cache.
inline void stream_store(void* p, __m128i v) {
  _mm_stream_si128(static_cast<__m128i*>(p), v);
}

inline void stream_store(void* p, __m256i v) {
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
    return;
  }
  stream_store(p, _mm256_castsi256_si128(v));
  stream_store(static_cast<char*>(p) + 16, _mm256_extracti128_si256(v, 1));
}

#if defined(CPU_CAPABILITY_AVX512)
inline void stream_store(void* p, __m512i v) {
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
    return;
  }
  stream_store(p, _mm512_castsi512_si256(v));
  stream_store(static_cast<char*>(p) + 32, _mm512_extracti64x4_epi64(v, 1));
}
#endif
#endif

// Stores the bytes of one vector register v (a Vectorized<T>, __m128i, __m256i or __m512i) at p: streaming when
// `stream` and p is at least 16-byte aligned (see stream_store), else a plain store.
template <typename V>
inline void store_bytes(void* p, const V& v, bool stream) {
  constexpr size_t kBytes = sizeof(V);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (stream && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
    if constexpr (kBytes == 16) {
      __m128i r;
      std::memcpy(&r, &v, kBytes);
      stream_store(p, r);
      return;
    } else if constexpr (kBytes == 32) {
      __m256i r;
      std::memcpy(&r, &v, kBytes);
      stream_store(p, r);
      return;
    }
#if defined(CPU_CAPABILITY_AVX512)
    else if constexpr (kBytes == 64) {
      __m512i r;
      std::memcpy(&r, &v, kBytes);
      stream_store(p, r);
      return;
    }
#endif
  }
#else
  (void)stream;
#endif
  std::memcpy(p, &v, kBytes);
}

// Orders this thread's streaming stores before whatever it does next (they are weakly ordered): called by a
// kernel thread once its part of the output is written.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// p rounded up to the next multiple of `alignment` bytes (a power of two).
template <typename T>
inline T* align_up(T* p, uintptr_t alignment) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + alignment - 1) & ~(alignment - 1));
}

// Copies n elements from src (in cache) to dst with streaming stores, in order, one register at a time; a tail
// shorter than a register is stored plainly. Where dst is line-aligned, every line is one aligned store.
template <typename scalar_t>
inline void stream_copy(const scalar_t* src, scalar_t* dst, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    store_bytes(dst + i, Vec::loadu(src + i), /*stream=*/true);
  }
  if (i < n) {
    std::memcpy(dst + i, src + i, (n - i) * sizeof(scalar_t));
  }
}

// Rounds float vectors to bfloat16 / float16 (nearest even). Built for AVX512_BF16, bfloat16 takes the native
// instructions (one vcvtne2ps2bf16 for 32 values, where ATen's emulation costs ~7 per 16); they flush float
// subnormals (below 1.2e-38) to zero, as oneDNN's bf16 kernels do.
template <typename scalar_t>
inline Vectorized<scalar_t> pack_reduced(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(VLFUSE_ISA_AVX512_BF16)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return Vectorized<scalar_t>((__m512i)_mm512_cvtne2ps_pbh(__m512(hi), __m512(lo)));
  }
#endif
  return at::vec::convert_from_float<scalar_t>(lo, hi);
}

#if defined(CPU_CAPABILITY_AVX512)
// One float vector's values as bfloat16 / float16 bits: half a register.
template <typename scalar_t>
inline __m256i pack_reduced_half(const Vectorized<float>& v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#if defined(VLFUSE_ISA_AVX512_BF16)
    return (__m256i)_mm512_cvtneps_pbh(__m512(v));
#else
    return at::vec::cvtfp32_bf16(__m512(v));
#endif
  } else {
    return at::vec::cvtfp32_fp16(__m512(v));
  }
}
#endif

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

  static inline void store(scalar_t* p, int64_t n, const fVec* v, bool stream = false) {
    if constexpr (kReduced) {
      auto b = pack_reduced<scalar_t>(v[0], v[1]);
      if (n == kBlock) {
        store_bytes(p, b, stream);
      } else {
        b.store(p, n);
      }
    } else {
      if (n == kBlock) {
        store_bytes(p, v[0], stream);
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
inline void store_acc_vec(scalar_t* p, const Vectorized<at::opmath_type<scalar_t>>& v, bool stream = false) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
#if defined(CPU_CAPABILITY_AVX512)
    store_bytes(p, pack_reduced_half<scalar_t>(v), stream);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i packed = kBf16 ? at::vec::cvtfp32_bf16(__m256(v)) : at::vec::cvtfp32_fp16(__m256(v));
    store_bytes(p, packed, stream);
#else
    constexpr int64_t W = Vectorized<float>::size();
    __at_align__ float values[W];
    v.store(values);
    for (int64_t k = 0; k < W; ++k) {
      p[k] = static_cast<scalar_t>(values[k]);
    }
#endif
  } else {
    store_bytes(p, v, stream);
  }
}

// The same for the last n < Vectorized<acc_t>::size() elements of a row (lanes past n load as zero), with masked
// loads and stores where the ISA has them rather than a scalar loop through the stack. A later load that touches
// a masked store's full width waits for the store to retire, so a kernel that can end a row with a whole vector
// overlapping the one before it does that instead (rope_cpu.cpp's rotate_row).
template <typename scalar_t>
inline Vectorized<at::opmath_type<scalar_t>> load_acc_vec(const scalar_t* p, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {
    return Vectorized<acc_t>::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    __m512 out;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      at::vec::cvtbf16_fp32(raw, out);
    } else {
      at::vec::cvtfp16_fp32(raw, out);
    }
    return out;
#else
    __at_align__ acc_t values[Vectorized<acc_t>::size()] = {};
    for (int64_t k = 0; k < n; ++k) {
      values[k] = static_cast<acc_t>(p[k]);
    }
    return Vectorized<acc_t>::loadu(values);
#endif
  }
}

// The first half of the lanes of a float or double register.
#if defined(CPU_CAPABILITY_AVX512)
inline __m256 low_half(const Vectorized<float>& v) { return _mm512_castps512_ps256(v); }
inline __m256d low_half(const Vectorized<double>& v) { return _mm512_castpd512_pd256(v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline __m128 low_half(const Vectorized<float>& v) { return _mm256_castps256_ps128(v); }
inline __m128d low_half(const Vectorized<double>& v) { return _mm256_castpd256_pd128(v); }
#endif

// Writes lanes [0, n) of v; streaming when `stream` and n is half a register (a row of 8 floats on AVX-512), so
// that the row's line is written like the others.
template <typename scalar_t>
inline void store_acc_vec(scalar_t* p, const Vectorized<at::opmath_type<scalar_t>>& v, int64_t n, bool stream = false) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vectorized<acc_t>::size();
  if constexpr (!at::vec::is_reduced_floating_point_v<scalar_t>) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if (stream && 2 * n == W) {
      store_bytes(p, low_half(v), true);
      return;
    }
#endif
    v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i packed = pack_reduced_half<scalar_t>(v);
    if (stream && 2 * n == W) {
      store_bytes(p, _mm256_castsi256_si128(packed), true);
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), packed);
    }
#else
    (void)stream;
    __at_align__ acc_t values[W];
    v.store(values);
    for (int64_t k = 0; k < n; ++k) {
      p[k] = static_cast<scalar_t>(values[k]);
    }
#endif
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


// Whole-block loads and stores for row kernels that only combine a block's elements lane by lane (with
// broadcast values and with [C] tables such as a norm weight): they may hand the kernel the block's elements in
// a permuted lane order, which is free for such a kernel as long as its tables are laid out the same way
// (reorder_blocks, to_block) and anything per-channel it writes back is put back in natural order (to_block false).
// kPermuted says whether this type does. bfloat16 on AVX2 and in the AVX512_BF16 build does: a block's two float
// vectors hold its even and its odd elements, one load and one shift or mask per vector, where the natural order
// costs a widening shuffle per vector (AVX2 also cross-lane extracts, and packing on the way out; AVX512_BF16
// packs a block with one vcvtne2ps2bf16 and one vpermw either way). Other types and ISAs keep the natural
// order. Only whole blocks (kBlock elements) go through here; a row's shorter last block uses VecIO, in
// natural order (reorder_blocks leaves it in place).
template <typename scalar_t>
struct BlockIO {
  using IO = VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  static constexpr bool kPermuted = false;
  static inline void load(const scalar_t* p, fVec* out) {
    IO::load(p, IO::kBlock, out);
  }
  static inline void store(scalar_t* p, const fVec* v, bool stream = false) {
    IO::store(p, IO::kBlock, v, stream);
  }
};

#if defined(CPU_CAPABILITY_AVX2)
template <>
struct BlockIO<c10::BFloat16> {
  using fVec = Vectorized<float>;
  static constexpr bool kPermuted = true;
  // Part 0 holds elements 0, 2, 4, ... of the block (a bfloat16 is the high half of its float), part 1
  // elements 1, 3, 5, ...
  static inline void load(const c10::BFloat16* p, fVec* out) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
  }
  static inline void store(c10::BFloat16* p, const fVec* v, bool stream = false) {
    const __m256i even = _mm256_srli_epi32(round_to_high_half(v[0]), 16);
    const __m256i odd = _mm256_and_si256(round_to_high_half(v[1]), _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
    store_bytes(p, _mm256_or_si256(even, odd), stream);
  }

 private:
  // The float's bits rounded to nearest even at bit 16, so their high half is the bfloat16 (as c10's
  // round_to_nearest_even); NaN becomes the quiet NaN 0x7FC0, whose payload the rounding could otherwise carry
  // into the exponent.
  static inline __m256i round_to_high_half(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
  }
};
#endif

#if defined(VLFUSE_ISA_AVX512_BF16)
template <>
struct BlockIO<c10::BFloat16> {
  using fVec = Vectorized<float>;
  static constexpr bool kPermuted = true;
  // Part 0 holds elements 0, 2, 4, ... of the block (a bfloat16 is the high half of its float), part 1
  // elements 1, 3, 5, ...
  static inline void load(const c10::BFloat16* p, fVec* out) {
    const __m512i raw = _mm512_loadu_si512(p);
    out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    out[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
  }
  static inline void store(c10::BFloat16* p, const fVec* v, bool stream = false) {
    // Rounded and packed as [even elements | odd elements], then interleaved back into element order.
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(__m512(v[1]), __m512(v[0]));
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    store_bytes(p, _mm512_permutexvar_epi16(order, halves), stream);
  }
};
#endif

#if defined(VLFUSE_ISA_AVX512_BF16)
// Sums of the n bfloat16 values at p and of their squares, in float32, straight from the bfloat16 bits:
// vdpbf16ps multiplies pairs of bfloat16 exactly and adds both products into a float lane, one instruction per
// 32 values and sum (x * 1 for the sum), where widening costs two more per 32 and then four float ops. Like the
// other AVX512_BF16 instructions it reads subnormal inputs (below 1.2e-38) as zero. Eight independent
// accumulators per sum cover the instruction's latency.
inline void bf16_sums(const c10::BFloat16* p, int64_t n, float& sum, float& sum_sq) {
  constexpr int kChains = 8;
  constexpr int64_t kStep = 32;
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
  __m512 s[kChains], q[kChains];
  for (int c = 0; c < kChains; ++c) {
    s[c] = q[c] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + kChains * kStep <= n; i += kChains * kStep) {
    for (int c = 0; c < kChains; ++c) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(p + i + c * kStep);
      s[c] = _mm512_dpbf16_ps(s[c], v, ones);
      q[c] = _mm512_dpbf16_ps(q[c], v, v);
    }
  }
  for (int c = 0; i < n; i += kStep, ++c) {
    const __mmask32 valid = n - i >= kStep ? ~__mmask32(0) : (__mmask32(1) << (n - i)) - 1;
    const __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(valid, p + i);
    s[c] = _mm512_dpbf16_ps(s[c], v, ones);
    q[c] = _mm512_dpbf16_ps(q[c], v, v);
  }
  for (int width = kChains / 2; width > 0; width /= 2) {
    for (int c = 0; c < width; ++c) {
      s[c] = _mm512_add_ps(s[c], s[c + width]);
      q[c] = _mm512_add_ps(q[c], q[c + width]);
    }
  }
  sum = _mm512_reduce_add_ps(s[0]);
  sum_sq = _mm512_reduce_add_ps(q[0]);
}
#endif

// Index, within its block, of the element that BlockIO<scalar_t> puts in lane `lane` of part `part`.
template <typename scalar_t>
constexpr int64_t block_source_index(int part, int64_t lane) {
  constexpr int64_t W = VecIO<scalar_t>::fVec::size();
  return BlockIO<scalar_t>::kPermuted ? 2 * lane + part : part * W + lane;
}

// Moves the [C] table src to dst between natural order and BlockIO<scalar_t>'s lane order, whole block by whole
// block (the last, shorter block stays as it is): to_block = true so that whole-block kernels can load the table
// with plain vector loads, false to put per-channel results computed in that order back.
template <typename scalar_t, typename T>
void reorder_blocks(const T* src, int64_t C, T* dst, bool to_block) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t W = IO::fVec::size();
  const int64_t whole = C / IO::kBlock * IO::kBlock;
  for (int64_t i = 0; i < whole; i += IO::kBlock) {
    for (int part = 0; part < IO::kAccPerBlock; ++part) {
      for (int64_t lane = 0; lane < W; ++lane) {
        const int64_t natural = i + block_source_index<scalar_t>(part, lane), blocked = i + part * W + lane;
        if (to_block) {
          dst[blocked] = src[natural];
        } else {
          dst[natural] = src[blocked];
        }
      }
    }
  }
  for (int64_t i = whole; i < C; ++i) {
    dst[i] = src[i];
  }
}

// Asks for the cache line holding p in L1 ahead of its use (a hint: no effect on results, nor on bad addresses).
inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

}  // namespace vlfuse::cpu
