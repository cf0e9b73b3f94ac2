// CUDA packing kernel. One block per merge window (m * m patches, which are consecutive output rows): it reads
// the window's [C, Tp, m * P, m * P] pixels along frame rows into shared memory, already normalized and in the
// output dtype, then writes the window's m * m * K output values as one contiguous run of 16-byte stores.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "patchify/patchify.h"

namespace vlfuse::patchify {

namespace {

constexpr int kThreads = 256;
constexpr int kDefaultSharedBytes = 48 * 1024;

template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) patchify_kernel(const Params p) {
  using acc_t = at::opmath_type<out_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  out_t* tile = reinterpret_cast<out_t*>(shared_raw);

  const int64_t P = p.patch, Tp = p.temporal, m = p.merge;
  const int64_t window = m * m;
  const int64_t span = m * P;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * window;  // the window's first output row
  const Item& it = p.items[item_of(p, first, 0)];
  const PatchPosition origin = patch_position(first - it.first_patch, it.grid_h, it.grid_w, m);
  const in_t* frames = static_cast<const in_t*>(it.frames);
  const int64_t y0 = origin.ph * P, x0 = origin.pw * P;

  // Consecutive threads read consecutive pixels of one frame row (span of them per row).
  const int64_t tile_elems = p.channels * Tp * span * span;
  for (int64_t i = threadIdx.x; i < tile_elems; i += blockDim.x) {
    const int64_t xx = i % span;
    int64_t r = i / span;
    const int64_t yy = r % span;
    r /= span;
    const int64_t tp = r % Tp;
    const int64_t c = r / Tp;
    const int64_t f = source_frame(origin.t, tp, Tp, it.num_frames);
    const in_t pixel = frames[f * it.stride_t + c * it.stride_c + (y0 + yy) * it.stride_h + (x0 + xx) * it.stride_w];
    tile[i] = static_cast<out_t>(normalize<acc_t>(static_cast<acc_t>(pixel), static_cast<acc_t>(p.scale[c]),
                                                  static_cast<acc_t>(p.shift[c])));
  }
  __syncthreads();

  const int64_t K = p.patch_elems();
  const int64_t count = window * K;
  out_t* dst = static_cast<out_t*>(p.out) + first * K;
  auto value = [&](int64_t j) {
    const int64_t w = j / K;
    const PatchElement e = patch_element(j - w * K, Tp, P);
    const int64_t y = (w / m) * P + e.py;
    const int64_t x = (w % m) * P + e.px;
    return tile[((e.c * Tp + e.tp) * span + y) * span + x];
  };
  using Pack = Pack16<out_t>;
  constexpr int V = Pack::kSize;
  if (count % V == 0 && reinterpret_cast<uintptr_t>(dst) % sizeof(Pack) == 0) {
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < count; j += static_cast<int64_t>(blockDim.x) * V) {
      Pack pack;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        pack.v[k] = value(j + k);
      }
      *reinterpret_cast<Pack*>(dst + j) = pack;
    }
  } else {
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
      dst[j] = value(j);
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
  TORCH_CHECK(windows <= std::numeric_limits<int32_t>::max(), "vlfuse.patchify: ", windows,
              " merge windows in one call exceed the CUDA grid; split the input");
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
