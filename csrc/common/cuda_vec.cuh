// Vector access shared by the CUDA kernels: N elements moved as one aligned load or store (16 bytes at most).
#pragma once

#include <cstdint>
#include <cstring>

namespace vlfuse::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int kBytes>
struct Bits;
template <>
struct Bits<16> {
  using type = uint4;
};
template <>
struct Bits<8> {
  using type = uint2;
};
template <>
struct Bits<4> {
  using type = uint32_t;
};
template <>
struct Bits<2> {
  using type = uint16_t;
};
template <>
struct Bits<1> {
  using type = uint8_t;
};

template <typename T, int N>
__device__ inline Pack<T, N> load_pack(const T* src) {
  return *reinterpret_cast<const Pack<T, N>*>(src);
}

// dst in global memory. 16 and 8 bytes go as one explicit st.global.v4 / v2: a plain store of the pack, even
// through an integer vector type, was split into 4-byte stores where the compiler merged two stores' paths
// (rope's out_hi).
template <typename T, int N>
__device__ inline void store_pack(T* dst, const Pack<T, N>& pk) {
  using B = typename Bits<sizeof(Pack<T, N>)>::type;
  B bits;
  memcpy(&bits, &pk, sizeof(B));
  if constexpr (sizeof(B) == 16) {
    asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(bits.x), "r"(bits.y), "r"(bits.z), "r"(bits.w)
        : "memory");
  } else if constexpr (sizeof(B) == 8) {
    asm("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(bits.x), "r"(bits.y) : "memory");
  } else {
    *reinterpret_cast<B*>(dst) = bits;
  }
}

// N consecutive values from src (aligned to 16 bytes, or to N * sizeof(T) when that is smaller) in 16-byte
// loads.
template <typename T, int N>
__device__ inline void load_values(const T* src, T (&dst)[N]) {
  constexpr int kPer = N * sizeof(T) < 16 ? N : static_cast<int>(16 / sizeof(T));
  static_assert(N % kPer == 0, "N values must split into whole 16-byte loads");
#pragma unroll
  for (int q = 0; q < N / kPer; ++q) {
    const Pack<T, kPer> pk = load_pack<T, kPer>(src + q * kPer);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      dst[q * kPer + e] = pk.v[e];
    }
  }
}

}  // namespace vlfuse::cuda
