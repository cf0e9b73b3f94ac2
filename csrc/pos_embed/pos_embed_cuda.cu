// CUDA position table resampling kernels.
// Forward: one warp per token; the warp computes the token's four taps once and its lanes walk the channels in
// 16-byte packs, reading the four table rows (the table is small and stays in L2) and writing the output row once.
// Backward: deterministic, no atomics: one block per table row (times a slice of the channels when the row is
// wider than a block), each thread owning one pack of channels and summing, in a fixed order, the gradient rows of
// the tokens that read that table row. The tokens come from the inverse tap ranges of pos_embed.h, from a small
// [items, 2, side + 1] table of first(i) per item and axis that one kernel computes first.
// A grid_thw that lives on the GPU gets its per-item token offsets from a one-warp scan on the device, which also
// checks it, so no path needs a host sync.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/cuda_grid.cuh"
#include "common/cuda_vec.cuh"
#include "pos_embed/pos_embed.h"

namespace vlfuse::pos_embed {

namespace {

constexpr int kWarp = 32;
constexpr int kForwardWarps = 8;
constexpr int kBackwardThreads = 256;
constexpr int kFirstsThreads = 256;

using cuda::load_pack;
using cuda::load_values;
using cuda::Pack;
using cuda::store_pack;

// Whether an item's grid row holds tokens the kernels can index: what the host checks, and what
// grid_offsets_kernel asserts for a device grid (a failed row only keeps the kernels in bounds once that assertion
// has fired). The remainders are 32-bit (check_sizes bounds merge_size): a 64-bit one is a subroutine call, and
// the registers saved around it spilled.
__device__ inline bool valid_item(int64_t t, int64_t h, int64_t w, int64_t m) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (!(t > 0 && h > 0 && w > 0 && t <= kMax && h <= kMax && w <= kMax)) {
    return false;
  }
  const int32_t m32 = static_cast<int32_t>(m);
  return static_cast<int32_t>(h) % m32 == 0 && static_cast<int32_t>(w) % m32 == 0;
}

// The tokens before each item of a device grid (common/cuda_grid.cuh), checked there.
__global__ void grid_offsets_kernel(const Params p, int64_t* __restrict__ offsets) {
  const int64_t m = p.merge_size;
  cuda::warp_grid_offsets(
      p.grid, p.grid_stride0, p.grid_stride1, p.items, m, p.tokens, 1,
      [m](int64_t t, int64_t h, int64_t w) { return valid_item(t, h, w, m) ? t * h * w : int64_t{0}; }, offsets);
}

// The item holding token tok: the last i with offsets[i] <= tok. 32-bit: the launches check that tokens fit,
// and a 64-bit division in the index math below would be a subroutine call.
__device__ inline int32_t find_item(const int64_t* offsets, int32_t items, int32_t tok) {
  int32_t lo = 0, hi = items;  // invariant: offsets[lo] <= tok < offsets[hi]
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= tok) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kForwardWarps* kWarp) forward_kernel(const Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarp;
  if (tok >= p.tokens) {
    return;
  }
  const int32_t item = find_item(p.offsets, static_cast<int32_t>(p.items), static_cast<int32_t>(tok));
  const int64_t* g = p.grid + item * p.grid_stride0;
  if (!valid_item(g[0], g[p.grid_stride1], g[2 * p.grid_stride1], p.merge_size) || tok >= p.offsets[item + 1]) {
    return;
  }
  const TokenTaps<int32_t> taps = token_taps<int32_t>(
      static_cast<int32_t>(tok - p.offsets[item]), static_cast<int32_t>(g[p.grid_stride1]),
      static_cast<int32_t>(g[2 * p.grid_stride1]), static_cast<int32_t>(p.merge_size), static_cast<int32_t>(p.side));
  const scalar_t* table = static_cast<const scalar_t*>(p.table);
  const scalar_t* rows[4];
  acc_t weight[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    rows[k] = table + static_cast<int64_t>(taps.index[k]) * p.table_stride;
    weight[k] = static_cast<acc_t>(taps.weight[k]);
  }
  const acc_t* bias = static_cast<const acc_t*>(p.bias);
  scalar_t* dst = static_cast<scalar_t*>(p.out) + tok * p.channels;
  const int64_t packs = p.channels / VEC;
  for (int64_t idx = lane; idx < packs; idx += kWarp) {
    Pack<scalar_t, VEC> v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = load_pack<scalar_t, VEC>(rows[k] + idx * VEC);
    }
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc[e] = static_cast<acc_t>(v[0].v[e]) * weight[0];
    }
#pragma unroll
    for (int k = 1; k < 4; ++k) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc[e] += static_cast<acc_t>(v[k].v[e]) * weight[k];
      }
    }
    if (bias != nullptr) {
      acc_t b[VEC];
      load_values(bias + idx * VEC, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc[e] += b[e];
      }
    }
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      out.v[e] = static_cast<scalar_t>(acc[e]);
    }
    store_pack(dst + idx * VEC, out);
  }
}

// firsts[(item * 2 + axis) * (side + 1) + i] = first(i) of the item's h (axis 0) or w (axis 1) axis; zeros for an
// item that holds no tokens (its ranges are then empty).
__global__ void axis_firsts_kernel(const Params p, int32_t* __restrict__ firsts) {
  const int64_t stride = p.side + 1;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.items * 2 * stride) {
    return;
  }
  const int64_t item = e / (2 * stride), axis = e / stride % 2, i = e % stride;
  const int64_t* g = p.grid + item * p.grid_stride0;
  const int64_t t = g[0], h = g[p.grid_stride1], w = g[2 * p.grid_stride1];
  const bool holds_tokens = valid_item(t, h, w, p.merge_size);
  firsts[e] = holds_tokens ? static_cast<int32_t>(first_target<int64_t>(i, axis == 0 ? h : w, p.side)) : 0;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBackwardThreads)
    backward_kernel(const Params p, const int32_t* __restrict__ firsts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t packs = p.channels / VEC;
  const int64_t idx = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (idx >= packs) {
    return;
  }
  const int32_t side = static_cast<int32_t>(p.side), m = static_cast<int32_t>(p.merge_size);
  const int32_t cell = static_cast<int32_t>(blockIdx.x);
  const int32_t i = cell / side, j = cell - i * side;
  const int32_t stride = side + 1;
  const scalar_t* grad = static_cast<const scalar_t*>(p.grad_out) + idx * VEC;
  acc_t acc[VEC] = {};
  for (int32_t item = 0; item < static_cast<int32_t>(p.items); ++item) {
    const int64_t* g = p.grid + item * p.grid_stride0;
    const int64_t t = g[0], h = g[p.grid_stride1], w = g[2 * p.grid_stride1];
    if (!valid_item(t, h, w, m) || p.offsets[item + 1] > p.tokens) {
      continue;
    }
    const int32_t h32 = static_cast<int32_t>(h), w32 = static_cast<int32_t>(w), t32 = static_cast<int32_t>(t);
    int32_t row_begin[2], row_end[2], col_begin[2], col_end[2];
    tap_ranges<int32_t>(firsts + item * 2 * stride, i, h32, side, row_begin, row_end);
    tap_ranges<int32_t>(firsts + (item * 2 + 1) * stride, j, w32, side, col_begin, col_end);
    const int32_t item_first = static_cast<int32_t>(p.offsets[item]);
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      for (int32_t r = row_begin[a]; r < row_end[a]; ++r) {
        const AxisTaps<int32_t> th = axis_taps<int32_t>(r, h32, side);
        const float w_row = a == 0 ? th.w_lo : th.w_hi;
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          for (int32_t c = col_begin[b]; c < col_end[b]; ++c) {
            const AxisTaps<int32_t> tw = axis_taps<int32_t>(c, w32, side);
            const acc_t weight = static_cast<acc_t>(w_row * (b == 0 ? tw.w_lo : tw.w_hi));
            const int32_t first = item_first + merge_order_index<int32_t>(r, c, w32, m);
            for (int32_t f = 0; f < t32; ++f) {
              const int64_t token = first + f * h32 * w32;
              const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(grad + token * p.grad_out_stride);
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                acc[e] += static_cast<acc_t>(v.v[e]) * weight;
              }
            }
          }
        }
      }
    }
  }
  Pack<scalar_t, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    out.v[e] = static_cast<scalar_t>(acc[e]);
  }
  store_pack(static_cast<scalar_t*>(p.grad_table) + static_cast<int64_t>(cell) * p.channels + idx * VEC, out);
}

bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Calls launch.template operator()<VEC>() with 16-byte packs when every row the kernel touches allows them.
template <typename scalar_t, typename Launch>
void with_vec(bool rows_aligned, int64_t channels, Launch&& launch) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (rows_aligned && channels % VEC == 0) {
    launch.template operator()<VEC>();
  } else {
    launch.template operator()<1>();
  }
}

void check_sizes(const char* op, const Params& p) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(p.tokens <= kMax && p.items <= kMax && p.side * p.side <= kMax && p.merge_size <= kMax,
                    "vlfuse.", op, ": ", p.tokens, " tokens, ", p.items, " items, a table of ", p.side * p.side,
                    " rows, merge_size ", p.merge_size,
                    ": the CUDA kernels index each in 32 bits (at most 2^31 - 1), split the input");
}

}  // namespace

void pos_embed_forward_cuda(const Params& params) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(params.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(params.device_index));
  Params p = params;
  const c10::DataPtr offsets = cuda::device_offsets(p, grid_offsets_kernel, stream);
  if (p.tokens == 0) {
    return;
  }
  check_sizes("interp_pos_embed", p);
  const int64_t blocks = (p.tokens + kForwardWarps - 1) / kForwardWarps;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.interp_pos_embed", [&] {
    const bool rows_aligned = aligned16(p.table) && (p.table_stride * sizeof(scalar_t)) % 16 == 0 &&
                              aligned16(p.out) && (p.bias == nullptr || aligned16(p.bias));
    with_vec<scalar_t>(rows_aligned, p.channels, [&]<int VEC>() {
      forward_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), kForwardWarps * kWarp, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void pos_embed_backward_cuda(const Params& params) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(params.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(params.device_index));
  Params p = params;
  const c10::DataPtr offsets = cuda::device_offsets(p, grid_offsets_kernel, stream);
  if (p.channels == 0) {
    return;
  }
  check_sizes("interp_pos_embed_backward", p);
  const int64_t entries = p.items * 2 * (p.side + 1);
  c10::DataPtr firsts =
      c10::cuda::CUDACachingAllocator::get()->allocate(std::max<int64_t>(entries, 1) * sizeof(int32_t));
  auto* firsts_ptr = static_cast<int32_t*>(firsts.get());
  if (entries > 0) {
    axis_firsts_kernel<<<static_cast<unsigned>((entries + kFirstsThreads - 1) / kFirstsThreads), kFirstsThreads, 0,
                         stream>>>(p, firsts_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.interp_pos_embed_backward", [&] {
    const bool rows_aligned = aligned16(p.grad_out) && (p.grad_out_stride * sizeof(scalar_t)) % 16 == 0 &&
                              aligned16(p.grad_table);
    with_vec<scalar_t>(rows_aligned, p.channels, [&]<int VEC>() {
      // The packs of a row split evenly over as few blocks as hold them, each a whole number of warps.
      const int64_t packs = p.channels / VEC;
      const int64_t slices = (packs + kBackwardThreads - 1) / kBackwardThreads;
      const int64_t threads = ((packs + slices - 1) / slices + kWarp - 1) / kWarp * kWarp;
      const dim3 grid(static_cast<unsigned>(p.side * p.side), static_cast<unsigned>(slices));
      TORCH_CHECK_VALUE(slices <= 65535, "vlfuse.interp_pos_embed_backward: ", p.channels,
                        " channels are too many for one launch");
      backward_kernel<scalar_t, VEC><<<grid, static_cast<unsigned>(threads), 0, stream>>>(p, firsts_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace vlfuse::pos_embed
