// CUDA norm + m x m merge kernels. One warp per token, visited in output order (slot = r * m^2 + k, so a
// block's warps write consecutive segments of the merged rows): the warp reads the token once in 16-byte
// vectors into registers (kLoads vectors per lane; rows too wide for that, or not 16-byte aligned, are re-read
// per pass from L1/L2 instead), reduces its statistics with shuffles and writes the normalized values straight
// into the merged row. Raster order locates each row's item by a binary search over per-item row offsets,
// which are computed on the device when grid_thw lives there, so no path needs a host sync.
// Backward: the same walk; each warp accumulates its weight/bias partial sums in its own shared-memory row,
// each block reduces its warps into one partial row, and one small kernel sums those rows in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_vec.cuh"
#include "merge/merge.h"

namespace vlfuse::merge {

namespace {

constexpr int kWarp = 32;
constexpr int kForwardWarps = 8;
constexpr int kBackwardWarps = 4;
constexpr size_t kSharedLimit = 48 * 1024;

using cuda::Pack;

template <typename T>
__device__ inline T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ inline void load_pack(const scalar_t* src, acc_t (&dst)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(src);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    dst[e] = static_cast<acc_t>(pk.v[e]);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ inline void store_pack(scalar_t* dst, const acc_t (&src)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    pk.v[e] = static_cast<scalar_t>(src[e]);
  }
  *reinterpret_cast<Pack<scalar_t, VEC>*>(dst) = pk;
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

// Token of slot (r, k), or -1 when a device-side grid_thw was inconsistent with x (the check kernel has then
// already raised a device assertion; the -1 only keeps this kernel in bounds).
__device__ inline int64_t slot_token(const Params& p, int64_t slot) {
  const int64_t mm = p.merge_size * p.merge_size;
  const int64_t r = slot / mm;
  const int64_t tok = source_token(p.order, r, slot - r * mm, p.merge_size, p.grid, p.grid_stride0,
                                   p.grid_stride1, p.offsets, p.items);
  return tok >= 0 && tok < p.tokens ? tok : -1;
}

// One thread: items are few (images and videos of one batch). Checks what the host checks for a host grid.
__global__ void grid_offsets_kernel(const Params p, int64_t* offsets) {
  const int64_t m = p.merge_size;
  int64_t rows = 0;
  offsets[0] = 0;
  for (int64_t i = 0; i < p.items; ++i) {
    const int64_t* g = p.grid + i * p.grid_stride0;
    const int64_t t = g[0], h = g[p.grid_stride1], w = g[2 * p.grid_stride1];
    CUDA_KERNEL_ASSERT_MSG(t >= 0 && h >= 0 && w >= 0 && h % m == 0 && w % m == 0,
                           "vlfuse.merge2x2: grid_thw has a negative size, or h or w not a multiple of merge_size");
    rows += (t > 0 && h > 0 && w > 0) ? t * (h / m) * (w / m) : 0;
    offsets[i + 1] = rows;
  }
  CUDA_KERNEL_ASSERT_MSG(rows * m * m == p.tokens,
                         "vlfuse.merge2x2: grid_thw describes a different number of tokens than x has");
}

template <typename scalar_t, int VEC, int kLoads>
__global__ void __launch_bounds__(kForwardWarps* kWarp) forward_kernel(const Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kForwardWarps + threadIdx.x / kWarp;
  if (slot >= p.tokens) {
    return;
  }
  const int64_t tok = slot_token(p, slot);
  if (tok < 0) {
    return;
  }
  const int64_t C = p.channels, packs = C / VEC;
  const scalar_t* xr = static_cast<const scalar_t*>(p.x) + tok * p.x_stride;
  acc_t xv[kLoads > 0 ? kLoads : 1][VEC];
  // Register mode: one read of the token; streaming mode: each pass below reloads its pack.
  auto values = [&](int l, int64_t idx) -> acc_t(&)[VEC] {
    if constexpr (kLoads == 0) {
      load_pack<scalar_t, acc_t, VEC>(xr + idx * VEC, xv[0]);
    }
    return xv[l];
  };
  if constexpr (kLoads > 0) {
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) { load_pack<scalar_t, acc_t, VEC>(xr + idx * VEC, xv[l]); });
  }
  acc_t mean0 = 0;
  if (p.norm == Norm::LayerNorm) {
    acc_t s = 0;
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
      const auto& v = values(l, idx);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        s += v[e];
      }
    });
    mean0 = warp_sum(s) / static_cast<acc_t>(C);
  }
  acc_t sd = 0, sd2 = 0;
  for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
    const auto& v = values(l, idx);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t d = v[e] - mean0;
      sd += d;
      sd2 += d * d;
    }
  });
  acc_t shift, var;
  corrected_moments<acc_t>(warp_sum(sd), warp_sum(sd2), static_cast<acc_t>(C), p.norm, shift, var);
  const acc_t mean = mean0 + shift;
  const acc_t rstd = acc_t(1) / ::sqrt(var + static_cast<acc_t>(p.eps));
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const acc_t* bias = static_cast<const acc_t*>(p.bias);
  scalar_t* y = static_cast<scalar_t*>(p.out) + slot * C;
  for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
    const auto& v = values(l, idx);
    acc_t o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t c = idx * VEC + e;
      o[e] = normalize<acc_t>(v[e], mean, rstd, weight[c], bias != nullptr ? bias[c] : acc_t(0));
    }
    store_pack<scalar_t, acc_t, VEC>(y + idx * VEC, o);
  });
  if (lane == 0) {
    if (p.mean != nullptr) {
      static_cast<acc_t*>(p.mean)[tok] = mean;
    }
    static_cast<acc_t*>(p.rstd)[tok] = rstd;
  }
}

// partial: [rows, 2, C] weight and bias partial sums; with shared_acc each block writes one row (its warps
// accumulate in shared memory), otherwise each warp accumulates straight into its own (zeroed) row.
template <typename scalar_t, int VEC, int kLoads>
__global__ void __launch_bounds__(kBackwardWarps* kWarp)
    backward_kernel(const Params p, at::opmath_type<scalar_t>* partial, bool shared_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t C = p.channels, packs = C / VEC;
  const bool want_wb = p.grad_weight != nullptr || p.grad_bias != nullptr;
  acc_t* acc_w = shared_acc ? reinterpret_cast<acc_t*>(smem_raw) + warp * 2 * C
                            : partial + (static_cast<int64_t>(blockIdx.x) * warps + warp) * 2 * C;
  acc_t* acc_b = acc_w + C;
  if (shared_acc && want_wb) {
    for (int64_t c = lane; c < 2 * C; c += kWarp) {
      acc_w[c] = 0;
    }
  }
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  for (int64_t slot = static_cast<int64_t>(blockIdx.x) * warps + warp; slot < p.tokens;
       slot += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t tok = slot_token(p, slot);
    if (tok < 0) {
      continue;
    }
    const int64_t mm = p.merge_size * p.merge_size, r = slot / mm, k = slot - r * mm;
    const scalar_t* xr = static_cast<const scalar_t*>(p.x) + tok * p.x_stride;
    const scalar_t* dyr = static_cast<const scalar_t*>(p.grad_out) + r * p.grad_out_stride + k * C;
    const acc_t mean = p.mean != nullptr ? static_cast<const acc_t*>(p.mean)[tok] : acc_t(0);
    const acc_t rstd = static_cast<const acc_t*>(p.rstd)[tok];
    acc_t xv[kLoads > 0 ? kLoads : 1][VEC], gv[kLoads > 0 ? kLoads : 1][VEC];
    auto load = [&](int l, int64_t idx) {
      load_pack<scalar_t, acc_t, VEC>(xr + idx * VEC, xv[l]);
      load_pack<scalar_t, acc_t, VEC>(dyr + idx * VEC, gv[l]);
    };
    if constexpr (kLoads > 0) {
      for_lane_packs<kLoads>(packs, lane, load);
    }
    acc_t mean_g = 0, mean_gx = 0;
    if (p.grad_x != nullptr) {
      acc_t sg = 0, sgx = 0;
      for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
        if constexpr (kLoads == 0) {
          load(l, idx);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t g = gv[l][e] * weight[idx * VEC + e];
          sg += g;
          sgx += g * (xv[l][e] - mean) * rstd;
        }
      });
      mean_g = p.norm == Norm::LayerNorm ? warp_sum(sg) * inv_c : acc_t(0);
      mean_gx = warp_sum(sgx) * inv_c;
    }
    for_lane_packs<kLoads>(packs, lane, [&](int l, int64_t idx) {
      if constexpr (kLoads == 0) {
        load(l, idx);
      }
      acc_t dx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t c = idx * VEC + e;
        const acc_t xhat = (xv[l][e] - mean) * rstd;
        dx[e] = norm_grad_input<acc_t>(gv[l][e] * weight[c], xhat, rstd, mean_g, mean_gx);
        if (want_wb) {
          acc_w[c] += gv[l][e] * xhat;
          acc_b[c] += gv[l][e];
        }
      }
      if (p.grad_x != nullptr) {
        store_pack<scalar_t, acc_t, VEC>(static_cast<scalar_t*>(p.grad_x) + tok * C + idx * VEC, dx);
      }
    });
  }
  if (shared_acc && want_wb) {
    __syncthreads();
    const acc_t* rows = reinterpret_cast<const acc_t*>(smem_raw);
    for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) {
      acc_t s = 0;
      for (int w = 0; w < warps; ++w) {
        s += rows[w * 2 * C + c];
      }
      partial[static_cast<int64_t>(blockIdx.x) * 2 * C + c] = s;
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

// Calls launch.template operator()<VEC, kLoads>() with the widest vectors the row layout allows and the
// fewest registers that hold a token's kRowsHeld rows (x; x and dy for the backward) within 128 values per lane,
// or the streaming walk (kLoads = 0) when they do not fit: more would spill.
template <typename scalar_t, int kRowsHeld, typename Launch>
void with_tiling(const Params& p, bool rows_aligned, Launch&& launch) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr int kMaxLoads = 128 / (VEC * kRowsHeld);
  if (!rows_aligned || p.channels % VEC != 0) {
    launch.template operator()<1, 0>();
    return;
  }
  const int64_t per_lane = (p.channels / VEC + kWarp - 1) / kWarp;
  if (per_lane <= 1) {
    launch.template operator()<VEC, 1>();
  } else if (per_lane <= 2) {
    launch.template operator()<VEC, 2>();
  } else if (per_lane <= 4 && kMaxLoads >= 4) {
    launch.template operator()<VEC, (kMaxLoads >= 4 ? 4 : 0)>();
  } else if (per_lane <= 8 && kMaxLoads >= 8) {
    launch.template operator()<VEC, (kMaxLoads >= 8 ? 8 : 0)>();
  } else if (per_lane <= 16 && kMaxLoads >= 16) {
    launch.template operator()<VEC, (kMaxLoads >= 16 ? 16 : 0)>();
  } else {
    launch.template operator()<VEC, 0>();
  }
}

// Row offsets of a grid_thw that lives on the GPU, derived and checked there (no host sync). Returns the
// allocation that p.offsets then points into.
c10::DataPtr device_offsets(Params& p, cudaStream_t stream) {
  if (!p.grid_on_device) {
    return {};
  }
  c10::DataPtr offsets = c10::cuda::CUDACachingAllocator::get()->allocate((p.items + 1) * sizeof(int64_t));
  grid_offsets_kernel<<<1, 1, 0, stream>>>(p, static_cast<int64_t*>(offsets.get()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.offsets = static_cast<const int64_t*>(offsets.get());
  return offsets;
}

}  // namespace

void merge_forward_cuda(const Params& params) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(params.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(params.device_index));
  Params p = params;
  const c10::DataPtr offsets = device_offsets(p, stream);
  if (p.tokens == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.merge2x2", [&] {
    const bool rows_aligned = aligned16(p.x) && aligned16(p.out) && (p.x_stride * sizeof(scalar_t)) % 16 == 0;
    with_tiling<scalar_t, 1>(p, rows_aligned, [&]<int VEC, int kLoads>() {
      const int64_t blocks = (p.tokens + kForwardWarps - 1) / kForwardWarps;
      forward_kernel<scalar_t, VEC, kLoads><<<blocks, kForwardWarps * kWarp, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void merge_backward_cuda(const Params& params) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(params.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(params.device_index));
  Params p = params;
  const c10::DataPtr offsets = device_offsets(p, stream);
  if (p.tokens == 0) {
    return;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device_index));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.merge2x2_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool rows_aligned = aligned16(p.x) && aligned16(p.grad_out) && aligned16(p.grad_x) &&
                              (p.x_stride * sizeof(scalar_t)) % 16 == 0 &&
                              (p.grad_out_stride * sizeof(scalar_t)) % 16 == 0;
    const bool want_wb = p.grad_weight != nullptr || p.grad_bias != nullptr;
    const size_t row_bytes = 2 * p.channels * sizeof(acc_t);
    // Each warp's weight/bias partial row lives in shared memory when at least one fits the default limit.
    const int warps = static_cast<int>(std::clamp<int64_t>(kSharedLimit / row_bytes, 1, kBackwardWarps));
    const bool shared_acc = want_wb && row_bytes <= kSharedLimit;
    const size_t smem = shared_acc ? warps * row_bytes : 0;
    with_tiling<scalar_t, 2>(p, rows_aligned, [&]<int VEC, int kLoads>() {
      auto* kernel = backward_kernel<scalar_t, VEC, kLoads>;
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * kWarp, smem));
      const int64_t blocks =
          std::min<int64_t>((p.tokens + warps - 1) / warps, static_cast<int64_t>(sms) * std::max(per_sm, 1));
      const int64_t partial_rows = want_wb ? (shared_acc ? blocks : blocks * warps) : 0;
      c10::DataPtr partial =
          c10::cuda::CUDACachingAllocator::get()->allocate(std::max<size_t>(partial_rows * row_bytes, 1));
      auto* partial_ptr = static_cast<acc_t*>(partial.get());
      if (want_wb && !shared_acc) {
        C10_CUDA_CHECK(cudaMemsetAsync(partial_ptr, 0, partial_rows * row_bytes, stream));
      }
      kernel<<<blocks, warps * kWarp, smem, stream>>>(p, partial_ptr, shared_acc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (want_wb) {
        const dim3 grid((p.channels + kWarp - 1) / kWarp, 2);
        column_sum_kernel<acc_t><<<grid, dim3(kWarp, 8), 0, stream>>>(
            partial_ptr, partial_rows, p.channels, static_cast<acc_t*>(p.grad_weight),
            static_cast<acc_t*>(p.grad_bias));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace vlfuse::merge
