// CUDA packing kernel. One block per merge window (m * m patches, which are consecutive output rows): its warps
// read the window's [C, Tp, m * P, m * P] pixels along frame rows and put each one, normalized and in the output
// dtype, at its place in the window's output rows in shared memory; the block then copies those rows out as
// one contiguous run of 16-byte stores. Within a window every index fits in 32 bits, and the walk steps its
// coordinates instead of dividing per element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "common/cuda_vec.cuh"
#include "patchify/patchify.h"

namespace vlfuse::patchify {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kDefaultSharedBytes = 48 * 1024;

using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) patchify_kernel(const Params p) {
  using acc_t = at::opmath_type<out_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  out_t* rows = reinterpret_cast<out_t*>(shared_raw);  // the window's m * m output rows

  const uint32_t P = static_cast<uint32_t>(p.patch), Tp = static_cast<uint32_t>(p.temporal);
  const uint32_t m = static_cast<uint32_t>(p.merge), C = static_cast<uint32_t>(p.channels);
  const uint32_t span = m * P;
  const uint32_t K = static_cast<uint32_t>(p.patch_elems());
  const uint32_t window = blockIdx.x;
  const int64_t first = static_cast<int64_t>(window) * (m * m);  // the window's first output row
  const Item& it = p.items[item_of(p, first, 0)];
  const PatchPosition origin =
      window_origin<uint32_t>(window - static_cast<uint32_t>(it.first_patch) / (m * m),
                              static_cast<uint32_t>(it.grid_h), static_cast<uint32_t>(it.grid_w), m);
  const in_t* frames = static_cast<const in_t*>(it.frames) + (origin.ph * P) * it.stride_h +
                       (origin.pw * P) * it.stride_w;

  // Lanes along a frame row (consecutive pixels), warps over the rows (c, tp, yy) with yy = wy * P + py.
  // Pixel (c, tp, wy * P + py, wx * P + px) is element ((c * Tp + tp) * P + py) * P + px of output row
  // wy * m + wx.
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (uint32_t xx = lane; xx < span; xx += 32) {
    const uint32_t wx = xx / P, px = xx - wx * P;
    const in_t* column = frames + xx * it.stride_w;
    const uint32_t plane0 = warp / span, yy0 = warp - plane0 * span;
    uint32_t c = plane0 / Tp, tp = plane0 - c * Tp, wy = yy0 / P, py = yy0 - wy * P;
    while (c < C) {
      const int64_t f = source_frame(origin.t, tp, Tp, it.num_frames);
      const in_t pixel = column[f * it.stride_t + c * it.stride_c + (wy * P + py) * it.stride_h];
      const uint32_t to = (wy * m + wx) * K + ((c * Tp + tp) * P + py) * P + px;
      rows[to] = static_cast<out_t>(normalize<acc_t>(static_cast<acc_t>(pixel), static_cast<acc_t>(p.scale[c]),
                                                     static_cast<acc_t>(p.shift[c])));
      py += kWarps;
      while (py >= P) {
        py -= P;
        if (++wy == m) {
          wy = 0;
          if (++tp == Tp) {
            tp = 0;
            ++c;
          }
        }
      }
    }
  }
  __syncthreads();

  const uint32_t count = m * m * K;
  out_t* dst = static_cast<out_t*>(p.out) + first * K;
  constexpr int V = 16 / sizeof(out_t);
  if (count % V == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    for (uint32_t j = threadIdx.x * V; j < count; j += kThreads * V) {
      store_pack(dst + j, load_pack<out_t, V>(rows + j));
    }
  } else {
    for (uint32_t j = threadIdx.x; j < count; j += kThreads) {
      dst[j] = rows[j];
    }
  }
}

template <typename in_t, typename out_t>
void launch_typed(const Params& p) {
  const int64_t span = p.merge * p.patch;
  const int64_t shared_bytes = p.channels * p.temporal * span * span * static_cast<int64_t>(sizeof(out_t));
  auto kernel = patchify_kernel<in_t, out_t>;
  if (shared_bytes > kDefaultSharedBytes) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device_index));
    TORCH_CHECK_VALUE(shared_bytes <= optin, "vlfuse.patchify: one merge window of C * Tp * (merge_size * ",
                      "patch_size)^2 values takes ", shared_bytes, " bytes of shared memory, more than the ", optin,
                      " this GPU offers per block; use smaller patch_size / merge_size or a narrower out_dtype");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  const int64_t windows = p.patches / (p.merge * p.merge);
  // One block per window; the kernel indexes a launch's patches in 32 bits.
  TORCH_CHECK(windows <= std::numeric_limits<int32_t>::max() && p.patches <= std::numeric_limits<uint32_t>::max(),
              "vlfuse.patchify: ", p.patches, " patches in one call exceed the CUDA kernel's 32-bit indexing; ",
              "split the input");
  const auto stream = c10::cuda::getCurrentCUDAStream(p.device_index);
  kernel<<<static_cast<unsigned>(windows), kThreads, static_cast<size_t>(shared_bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void patchify_cuda_kernel(const Params& p) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  const auto in_dtype = static_cast<at::ScalarType>(p.in_dtype);
  const auto out_dtype = static_cast<at::ScalarType>(p.out_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, in_dtype, "vlfuse.patchify", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "vlfuse.patchify.out",
                                    [&] { launch_typed<in_t, scalar_t>(p); });
  });
}

}  // namespace vlfuse::patchify
