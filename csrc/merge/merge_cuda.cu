// CUDA norm + m x m merge kernels. One warp per token, visited in output order (slot = r * m^2 + k, so a
// block's warps write consecutive segments of the merged rows): the warp reads the token once in 16-byte
// vectors into registers (kLoads packs per lane, kept in the input dtype; rows too wide for that, or not 16-byte
// aligned, are re-read per pass from L1/L2 instead), reduces its statistics with shuffles and writes the
// normalized values straight into the merged row. Raster order locates each row's item by a binary search over
// per-item row offsets, which are computed on the device when grid_thw lives there, so no path needs a host sync.
// Backward: the same walk in persistent blocks; each block stages the weight in shared memory, each warp
// accumulates its weight/bias partial sums in its own shared-memory rows, each block reduces its warps into one
// partial row, and one small kernel sums those rows in a fixed order.
// The post-shuffle norm (kPostshuffle) runs the same kernels with a merged row as the warp's unit: its m^2 * C
// values are one row of packs whose pack i lies in window slot i / (C / VEC) (UnitRows), reduced by the warp as
// a token is, with weight, bias and their gradients over [m^2 * C].
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "common/cuda_grid.cuh"
#include "common/cuda_vec.cuh"
#include "merge/merge.h"

namespace vlfuse::merge {

namespace {

constexpr int kWarp = 32;
constexpr int kForwardWarps = 8;
constexpr int kBackwardWarps = 4;
constexpr size_t kSharedLimit = 48 * 1024;
// Packs a lane may hold per row, and the registers it may spend on a token's rows (a 16-byte pack is 4): rows
// wider than that stream. A lane holds the smallest of these counts that fits the row (5 for bf16 at C = 1280).
constexpr int kTiles[] = {1, 2, 3, 4, 5, 6, 8, 10, 12, 16};
constexpr int kHeldRegisters = 96;
constexpr int kPostshuffleMaxLoads = 8;

using cuda::load_pack;
using cuda::load_values;
using cuda::Pack;
using cuda::store_pack;

// Most packs per lane that register mode holds for kRowsHeld rows (x; x and dy for the backward). float64 is
// there for gradcheck, not speed: it always streams, which keeps its kernels few.
template <typename scalar_t, int kRowsHeld>
constexpr int kMaxLoads = std::is_same_v<scalar_t, double> ? 0 : kHeldRegisters / (4 * kRowsHeld);

template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename acc_t, typename scalar_t, int VEC>
__device__ inline void widen(const Pack<scalar_t, VEC>& pk, acc_t (&dst)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    dst[e] = static_cast<acc_t>(pk.v[e]);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ inline Pack<scalar_t, VEC> narrow(const acc_t (&src)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    pk.v[e] = static_cast<scalar_t>(src[e]);
  }
  return pk;
}

// An empty asm that the compiler must assume rewrites the held packs: values it widened from them in the pass
// before cannot be reused after this point, so each pass widens again (one instruction per value) instead of
// keeping every widened value of every pass live at once, which doubled the registers of the bf16 kernels.
template <typename scalar_t, int VEC, int kLoads>
__device__ inline void rewiden_after_here(Pack<scalar_t, VEC> (&held)[kLoads]) {
  static_assert(sizeof(Pack<scalar_t, VEC>) == sizeof(uint4));
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    uint4 bits;
    memcpy(&bits, &held[l], sizeof(bits));
    asm volatile("" : "+r"(bits.x), "+r"(bits.y), "+r"(bits.z), "+r"(bits.w));
    memcpy(&held[l], &bits, sizeof(bits));
  }
}

// Calls f(l, idx) for each VEC-wide pack idx of a row that this lane owns: idx = lane + 32 l. With
// kLoads > 0 the lane owns at most kLoads packs (l is the register slot); kLoads == 0 walks any width, l = 0.
template <int kLoads, typename F>
__device__ inline void for_lane_packs(int64_t packs, int lane, F&& f) {
  if constexpr (kLoads > 0) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const int64_t idx = lane + static_cast<int64_t>(l) * kWarp;
      if (idx < packs) {
        f(l, idx);
      }
    }
  } else {
    for (int64_t idx = lane; idx < packs; idx += kWarp) {
      f(0, idx);
    }
  }
}

// The backward's shared-memory rows (the staged weight, each warp's weight and bias partial sums) hold channel
// (lane + 32 j) * VEC + e, element e of the lane's j-th pack, at slot (j * VEC + e) * 32 + lane: the 32 lanes
// touch 32 consecutive words at once (no bank conflicts), and a lane only ever touches slots = lane (mod 32).
// A row has slots for whole rounds of 32 packs; those past the last channel stay zero.
C10_HOST_DEVICE inline int64_t slot_row_size(int64_t channels, int vec) {
  return (channels / vec + kWarp - 1) / kWarp * kWarp * vec;
}

template <int VEC>
__device__ inline int64_t slot_of(int64_t idx, int e, int lane) {
  return ((idx / kWarp) * VEC + e) * kWarp + lane;
}

template <int VEC>
__device__ inline int64_t channel_of(int64_t slot) {
  const int64_t lane = slot % kWarp, t = slot / kWarp;
  return (lane + (t / VEC) * kWarp) * VEC + t % VEC;
}

// Output row r and window slot k of slot r * m^2 + k. 32-bit math (the launches check that the tokens fit):
// a 64-bit division is a subroutine call, and the registers saved around such calls spilled.
struct SlotPosition {
  uint32_t r, k;
};

__device__ inline SlotPosition slot_position(const Params& p, int64_t slot) {
  const uint32_t mm = static_cast<uint32_t>(p.merge_size * p.merge_size), s = static_cast<uint32_t>(slot);
  return {s / mm, s % mm};
}

// Token of slot (r, k), or -1 when a device-side grid_thw was inconsistent with x (the check kernel has then
// already raised a device assertion; the -1 only keeps this kernel in bounds).
__device__ inline int64_t slot_token(const Params& p, int64_t slot) {
  const SlotPosition pos = slot_position(p, slot);
  const uint32_t tok = source_token<uint32_t>(p.order, pos.r, pos.k, static_cast<uint32_t>(p.merge_size), p.grid,
                                              p.grid_stride0, p.grid_stride1, p.offsets,
                                              static_cast<uint32_t>(p.items));
  return tok < p.tokens ? static_cast<int64_t>(tok) : -1;
}

// Where one warp's unit lives: a token (slot r * m^2 + k of the output), or with kPostshuffle the m^2 tokens of
// merged row r, read as one row of m^2 * C / VEC packs.
template <bool kPostshuffle>
struct UnitRows {
  RowWindow<uint32_t> window;  // kPostshuffle
  int64_t token = 0;           // otherwise
  uint32_t token_packs = 0;    // C / VEC

  // Element offset of pack idx of the unit in a [S, C] tensor with row stride `stride`.
  __device__ inline int64_t offset(int64_t idx, int64_t stride, int vec) const {
    if constexpr (kPostshuffle) {
      const uint32_t i = static_cast<uint32_t>(idx), k = i / token_packs;
      return static_cast<int64_t>(window.token(k)) * stride + static_cast<int64_t>(i - k * token_packs) * vec;
    } else {
      return token * stride + idx * vec;
    }
  }

  // Index of the unit's statistics in mean and rstd.
  __device__ inline int64_t stat_index() const {
    if constexpr (kPostshuffle) {
      return window.r;
    } else {
      return token;
    }
  }
};

// Whether unit u (a token, or a merged row) exists. From Params (constant memory) and u alone: a bound kept in
// a register across the backward's loop was spilled.
template <bool kPostshuffle>
__device__ inline bool unit_exists(const Params& p, int64_t u) {
  return (kPostshuffle ? u * p.merge_size * p.merge_size : u) < p.tokens;
}

// Locates unit u; false when a device-side grid_thw was inconsistent with x (see slot_token).
template <bool kPostshuffle>
__device__ inline bool locate_unit(const Params& p, int64_t u, uint32_t token_packs, UnitRows<kPostshuffle>& at) {
  at.token_packs = token_packs;
  if constexpr (kPostshuffle) {
    const uint32_t m = static_cast<uint32_t>(p.merge_size);
    at.window = row_window<uint32_t>(p.order, static_cast<uint32_t>(u), m, p.grid, p.grid_stride0, p.grid_stride1,
                                     p.offsets, static_cast<uint32_t>(p.items));
    return at.window.token(m * m - 1) < p.tokens;  // the window's last token is its largest
  } else {
    at.token = slot_token(p, u);
    return at.token >= 0;
  }
}

// Calls f.template operator()<kPostshuffle>() for p.postshuffle.
template <typename F>
void with_postshuffle(const Params& p, F&& f) {
  if (p.postshuffle) {
    f.template operator()<true>();
  } else {
    f.template operator()<false>();
  }
}

// The merge units before each item of a device grid (common/cuda_grid.cuh), checked there.
__global__ void grid_offsets_kernel(const Params p, int64_t* __restrict__ offsets) {
  const int64_t m = p.merge_size;
  cuda::warp_grid_offsets(
      p.grid, p.grid_stride0, p.grid_stride1, p.items, m, p.tokens, m * m,
      [m](int64_t t, int64_t h, int64_t w) { return t > 0 && h > 0 && w > 0 ? t * (h / m) * (w / m) : int64_t{0}; },
      offsets);
}

template <typename scalar_t, int VEC, int kLoads, bool kPostshuffle>
__global__ void __launch_bounds__(kForwardWarps* kWarp) forward_kernel(const Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarp;
  if (!unit_exists<kPostshuffle>(p, unit)) {
    return;
  }
  UnitRows<kPostshuffle> at;
  if (!locate_unit<kPostshuffle>(p, unit, static_cast<uint32_t>(p.channels / VEC), at)) {
    return;
  }
  // N values normalized together: a token's C, or a merged row's m^2 * C.
  const int64_t N = kPostshuffle ? p.merge_size * p.merge_size * p.channels : p.channels, packs = N / VEC;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  Pack<scalar_t, VEC> held[kLoads > 0 ? kLoads : 1];
  if constexpr (kLoads > 0) {
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
      held[l] = load_pack<scalar_t, VEC>(x + at.offset(idx, p.x_stride, VEC));
    });
  }
  // Register mode: one read of the unit; streaming mode: each pass below reloads its pack.
  auto values = [&](int l, int64_t idx, acc_t (&v)[VEC]) {
    if constexpr (kLoads > 0) {
      widen(held[l], v);
    } else {
      widen(load_pack<scalar_t, VEC>(x + at.offset(idx, p.x_stride, VEC)), v);
    }
  };
  acc_t mean0 = 0;
  if (p.norm == Norm::LayerNorm) {
    acc_t s = 0;
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
      acc_t v[VEC];
      values(l, idx, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        s += v[e];
      }
    });
    mean0 = warp_sum(s) / static_cast<acc_t>(N);
    if constexpr (kLoads > 0) {
      rewiden_after_here(held);
    }
  }
  acc_t sd = 0, sd2 = 0;
  for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
    acc_t v[VEC];
    values(l, idx, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t d = v[e] - mean0;
      sd += d;
      sd2 += d * d;
    }
  });
  if constexpr (kLoads > 0) {
    rewiden_after_here(held);
  }
  acc_t shift, var;
  corrected_moments<acc_t>(warp_sum(sd), warp_sum(sd2), static_cast<acc_t>(N), p.norm, shift, var);
  const acc_t mean = mean0 + shift;
  const acc_t rstd = acc_t(1) / ::sqrt(var + static_cast<acc_t>(p.eps));
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const acc_t* bias = static_cast<const acc_t*>(p.bias);
  // Output units are consecutive: slot r * m^2 + k of C values, or merged row r of m^2 * C.
  scalar_t* y = static_cast<scalar_t*>(p.out) + unit * N;
  for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
    acc_t v[VEC], w[VEC], b[VEC] = {};
    values(l, idx, v);
    load_values(weight + idx * VEC, w);
    if (bias != nullptr) {
      load_values(bias + idx * VEC, b);
    }
    acc_t o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      o[e] = normalize<acc_t>(v[e], mean, rstd, w[e], b[e]);
    }
    store_pack(y + idx * VEC, narrow<scalar_t>(o));
  });
  if (lane == 0) {
    if (p.mean != nullptr) {
      static_cast<acc_t*>(p.mean)[at.stat_index()] = mean;
    }
    static_cast<acc_t*>(p.rstd)[at.stat_index()] = rstd;
  }
}

// kShared: the block stages the weight in shared memory and (when weight or bias gradients are wanted) each
// warp accumulates in its own shared rows, in the slot layout (slot_of); partial is then [blocks, 2, C], one
// row per block. Otherwise (rows too wide for shared memory) the weight is read from global memory and each
// warp accumulates straight into its own zeroed row of partial [blocks * warps, 2, C], in channel order.
// With kPostshuffle every C above is N = m^2 * C, the size of the weight. inv_n = 1 / N.
template <typename scalar_t, int VEC, int kLoads, bool kShared, bool kPostshuffle>
__global__ void __launch_bounds__(kBackwardWarps* kWarp)
    backward_kernel(const Params p, at::opmath_type<scalar_t>* partial, at::opmath_type<scalar_t> inv_n) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t C = kPostshuffle ? p.merge_size * p.merge_size * p.channels : p.channels, packs = C / VEC;
  const bool want_wb = p.grad_weight != nullptr || p.grad_bias != nullptr;
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const int64_t row = slot_row_size(C, VEC);
  acc_t* shared_weight = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* acc_w;
  if constexpr (kShared) {
    acc_w = shared_weight + row + warp * 2 * row;
    if (want_wb) {
      // Only this lane's own slots: no other lane touches them before the block's barrier.
      for (int64_t s = lane; s < 2 * row; s += kWarp) {
        acc_w[s] = 0;
      }
    }
    for (int64_t s = threadIdx.x; s < row; s += blockDim.x) {
      const int64_t c = channel_of<VEC>(s);
      shared_weight[s] = c < C ? weight[c] : acc_t(0);
    }
    __syncthreads();
  } else {
    acc_w = partial + (static_cast<int64_t>(blockIdx.x) * warps + warp) * 2 * C;
  }
  acc_t* acc_b = acc_w + (kShared ? row : C);
  auto acc_slot = [&](int64_t idx, int e) -> int64_t {
    if constexpr (kShared) {
      return slot_of<VEC>(idx, e, lane);
    } else {
      return idx * VEC + e;
    }
  };
  auto weights = [&](int64_t idx, acc_t (&w)[VEC]) {
    if constexpr (kShared) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        w[e] = shared_weight[slot_of<VEC>(idx, e, lane)];
      }
    } else {
      load_values(weight + idx * VEC, w);
    }
  };
  const scalar_t* x_base = static_cast<const scalar_t*>(p.x);
  const uint32_t token_packs = static_cast<uint32_t>(p.channels / VEC);
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * warps + warp; unit_exists<kPostshuffle>(p, unit);
       unit += static_cast<int64_t>(gridDim.x) * warps) {
    UnitRows<kPostshuffle> at;
    if (!locate_unit<kPostshuffle>(p, unit, token_packs, at)) {
      continue;
    }
    // The unit's output gradient is contiguous: slot (r, k) of C values, or merged row r.
    const scalar_t* dyr;
    if constexpr (kPostshuffle) {
      dyr = static_cast<const scalar_t*>(p.grad_out) + unit * p.grad_out_stride;
    } else {
      const SlotPosition pos = slot_position(p, unit);
      dyr = static_cast<const scalar_t*>(p.grad_out) + pos.r * p.grad_out_stride + pos.k * C;
    }
    const acc_t mean = p.mean != nullptr ? static_cast<const acc_t*>(p.mean)[at.stat_index()] : acc_t(0);
    const acc_t rstd = static_cast<const acc_t*>(p.rstd)[at.stat_index()];
    Pack<scalar_t, VEC> held_x[kLoads > 0 ? kLoads : 1], held_dy[kLoads > 0 ? kLoads : 1];
    if constexpr (kLoads > 0) {
      for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
        held_x[l] = load_pack<scalar_t, VEC>(x_base + at.offset(idx, p.x_stride, VEC));
        held_dy[l] = load_pack<scalar_t, VEC>(dyr + idx * VEC);
      });
    }
    auto values = [&](int l, int64_t idx, acc_t (&x)[VEC], acc_t (&dy)[VEC]) {
      if constexpr (kLoads > 0) {
        widen(held_x[l], x);
        widen(held_dy[l], dy);
      } else {
        widen(load_pack<scalar_t, VEC>(x_base + at.offset(idx, p.x_stride, VEC)), x);
        widen(load_pack<scalar_t, VEC>(dyr + idx * VEC), dy);
      }
    };
    // First pass: the weight and bias partial sums, and the row sums the input gradient needs.
    acc_t sg = 0, sgx = 0;
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
      acc_t x[VEC], dy[VEC], w[VEC];
      values(l, idx, x, dy);
      if (want_wb) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          acc_w[acc_slot(idx, e)] += dy[e] * ((x[e] - mean) * rstd);
          acc_b[acc_slot(idx, e)] += dy[e];
        }
      }
      if (p.grad_x != nullptr) {
        weights(idx, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t g = dy[e] * w[e];
          sg += g;
          sgx += g * (x[e] - mean) * rstd;
        }
      }
    });
    if (p.grad_x == nullptr) {
      continue;
    }
    if constexpr (kLoads > 0) {
      rewiden_after_here(held_x);
      rewiden_after_here(held_dy);
    }
    const acc_t mean_g = p.norm == Norm::LayerNorm ? warp_sum(sg) * inv_n : acc_t(0);
    const acc_t mean_gx = warp_sum(sgx) * inv_n;
    scalar_t* dx_base = static_cast<scalar_t*>(p.grad_x);
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
      acc_t x[VEC], dy[VEC], w[VEC], dx[VEC];
      values(l, idx, x, dy);
      weights(idx, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dx[e] = norm_grad_input<acc_t>(dy[e] * w[e], (x[e] - mean) * rstd, rstd, mean_g, mean_gx);
      }
      store_pack(dx_base + at.offset(idx, p.channels, VEC), narrow<scalar_t>(dx));
    });
  }
  if constexpr (kShared) {
    if (want_wb) {
      __syncthreads();
      const acc_t* rows = shared_weight + row;
      for (int64_t s = threadIdx.x; s < 2 * row; s += blockDim.x) {
        const int64_t which = s >= row ? 1 : 0, c = channel_of<VEC>(s - which * row);
        if (c < C) {
          acc_t sum = 0;
          for (int w = 0; w < warps; ++w) {
            sum += rows[w * 2 * row + s];
          }
          partial[(static_cast<int64_t>(blockIdx.x) * 2 + which) * C + c] = sum;
        }
      }
    }
  }
}

// grad_weight[c] (blockIdx.y = 0) or grad_bias[c] (1) = sum over partial rows, in row order per column slice.
template <typename acc_t>
__global__ void column_sum_kernel(const acc_t* partial, int64_t rows, int64_t C, acc_t* grad_weight,
                                  acc_t* grad_bias) {
  constexpr int kRowsInFlight = 8;
  __shared__ acc_t sums[kRowsInFlight][kWarp + 1];
  acc_t* out = blockIdx.y == 0 ? grad_weight : grad_bias;
  if (out == nullptr) {
    return;
  }
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  acc_t s = 0;
  if (c < C) {
    for (int64_t r = threadIdx.y; r < rows; r += kRowsInFlight) {
      s += partial[r * 2 * C + blockIdx.y * C + c];
    }
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 1; j < kRowsInFlight; ++j) {
      s += sums[j][threadIdx.x];
    }
    out[c] = s;
  }
}

bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Calls f.template operator()<tile>() with the smallest tile of kTiles up to kMax that holds per_lane packs;
// false when none does.
template <int kMax, typename F, size_t... I>
bool with_tile(int64_t per_lane, F&& f, std::index_sequence<I...>) {
  return (... || [&] {
    if constexpr (kTiles[I] <= kMax) {
      if (per_lane <= kTiles[I]) {
        f.template operator()<kTiles[I]>();
        return true;
      }
    }
    return false;
  }());
}

// Calls launch.template operator()<VEC, kLoads>() with the widest vectors the row layout allows and the
// fewest packs per lane that hold a unit's kRowsHeld rows of unit_size values, or the streaming walk
// (kLoads = 0) when they do not fit in kHeldRegisters: more would spill or cost occupancy. A merged row
// (kPostshuffle) is held in at most kPostshuffleMaxLoads packs per lane: its window's addressing takes
// registers too, and wider tiles spilled.
template <typename scalar_t, int kRowsHeld, bool kPostshuffle, typename Launch>
void with_tiling(const Params& p, int64_t unit_size, bool rows_aligned, Launch&& launch) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (!rows_aligned || p.channels % VEC != 0) {
    launch.template operator()<1, 0>();
    return;
  }
  const int64_t per_lane = (unit_size / VEC + kWarp - 1) / kWarp;
  constexpr int kMax = kPostshuffle ? std::min(kPostshuffleMaxLoads, kMaxLoads<scalar_t, kRowsHeld>)
                                    : kMaxLoads<scalar_t, kRowsHeld>;
  const bool held = with_tile<kMax>(
      per_lane, [&]<int kLoads>() { launch.template operator()<VEC, kLoads>(); },
      std::make_index_sequence<std::size(kTiles)>());
  if (!held) {
    launch.template operator()<VEC, 0>();
  }
}

void check_token_count(const Params& p) {
  TORCH_CHECK_VALUE(p.tokens <= std::numeric_limits<int32_t>::max(), "vlfuse.merge2x2: x has ", p.tokens,
                    " tokens; the CUDA kernels index tokens in 32 bits (at most 2^31 - 1), split the input");
}

}  // namespace

void merge_forward_cuda(const Params& params) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(params.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(params.device_index));
  Params p = params;
  const c10::DataPtr offsets = cuda::device_offsets(p, grid_offsets_kernel, stream);
  if (p.tokens == 0) {
    return;
  }
  check_token_count(p);
  const int64_t mm = p.merge_size * p.merge_size;
  const int64_t units = p.postshuffle ? p.tokens / mm : p.tokens;
  const int64_t unit_size = p.postshuffle ? mm * p.channels : p.channels;
  const int64_t blocks = (units + kForwardWarps - 1) / kForwardWarps;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.merge2x2", [&] {
    const bool rows_aligned = aligned16(p.x) && aligned16(p.out) && (p.x_stride * sizeof(scalar_t)) % 16 == 0 &&
                              aligned16(p.weight) && (p.bias == nullptr || aligned16(p.bias));
    with_postshuffle(p, [&]<bool kPostshuffle>() {
      with_tiling<scalar_t, 1, kPostshuffle>(p, unit_size, rows_aligned, [&]<int VEC, int kLoads>() {
        forward_kernel<scalar_t, VEC, kLoads, kPostshuffle>
            <<<static_cast<unsigned>(blocks), kForwardWarps * kWarp, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void merge_backward_cuda(const Params& params) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(params.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(params.device_index));
  Params p = params;
  const c10::DataPtr offsets = cuda::device_offsets(p, grid_offsets_kernel, stream);
  if (p.tokens == 0) {
    return;
  }
  check_token_count(p);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device_index));
  // Units of the walk (tokens, or merged rows) and the values per unit, which is also the size of the weight.
  const int64_t mm = p.merge_size * p.merge_size;
  const int64_t units = p.postshuffle ? p.tokens / mm : p.tokens, N = p.postshuffle ? mm * p.channels : p.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.merge2x2_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool rows_aligned = aligned16(p.x) && aligned16(p.grad_out) && aligned16(p.grad_x) &&
                              aligned16(p.weight) && (p.x_stride * sizeof(scalar_t)) % 16 == 0 &&
                              (p.grad_out_stride * sizeof(scalar_t)) % 16 == 0;
    const bool want_wb = p.grad_weight != nullptr || p.grad_bias != nullptr;
    with_postshuffle(p, [&]<bool kPostshuffle>() {
      with_tiling<scalar_t, 2, kPostshuffle>(p, N, rows_aligned, [&]<int VEC, int kLoads>() {
        // Shared memory: the staged weight row, plus each warp's weight and bias rows when those are wanted.
        const size_t row_bytes = slot_row_size(N, VEC) * sizeof(acc_t);
        const int64_t rows_fit = static_cast<int64_t>(kSharedLimit / row_bytes);
        const int rows_per_warp = want_wb ? 2 : 0;
        const bool shared = 1 + rows_per_warp <= rows_fit;
        const int warps = want_wb ? static_cast<int>(std::clamp<int64_t>((rows_fit - 1) / 2, 1, kBackwardWarps))
                                  : kBackwardWarps;
        const size_t smem = shared ? (1 + rows_per_warp * warps) * row_bytes : 0;
        auto launch = [&](auto* kernel) {
          int per_sm = 0;
          C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * kWarp, smem));
          const int64_t blocks =
              std::min<int64_t>((units + warps - 1) / warps, static_cast<int64_t>(sms) * std::max(per_sm, 1));
          const int64_t partial_rows = want_wb ? (shared ? blocks : blocks * warps) : 0;
          const size_t partial_bytes = partial_rows * 2 * N * sizeof(acc_t);
          c10::DataPtr partial = c10::cuda::CUDACachingAllocator::get()->allocate(std::max<size_t>(partial_bytes, 1));
          auto* partial_ptr = static_cast<acc_t*>(partial.get());
          if (want_wb && !shared) {
            C10_CUDA_CHECK(cudaMemsetAsync(partial_ptr, 0, partial_bytes, stream));
          }
          // 1 / N from the host: the device division's slow-path call cost a spill.
          const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
          kernel<<<static_cast<unsigned>(blocks), warps * kWarp, smem, stream>>>(p, partial_ptr, inv_n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (want_wb) {
            const dim3 grid((N + kWarp - 1) / kWarp, 2);
            column_sum_kernel<acc_t><<<grid, dim3(kWarp, 8), 0, stream>>>(
                partial_ptr, partial_rows, N, static_cast<acc_t*>(p.grad_weight),
                static_cast<acc_t*>(p.grad_bias));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        };
        // Rows held in registers are narrow enough for shared memory (see kHeldRegisters): only streaming
        // kernels need the global-memory variant.
        static_assert(3 * kMaxLoads<scalar_t, 2> * kWarp * VEC * sizeof(acc_t) <= kSharedLimit);
        if constexpr (kLoads > 0) {
          launch(backward_kernel<scalar_t, VEC, kLoads, true, kPostshuffle>);
        } else if (shared) {
          launch(backward_kernel<scalar_t, VEC, 0, true, kPostshuffle>);
        } else {
          launch(backward_kernel<scalar_t, VEC, 0, false, kPostshuffle>);
        }
      });
    });
  });
}

}  // namespace vlfuse::merge
