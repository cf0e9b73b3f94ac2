// The device side of common/grid.h: the per-item prefix sums of a grid_thw that lives on the GPU, computed and
// checked there, so that no op reads a device grid on the host.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vlfuse::cuda {

// One warp (launched <<<1, 32>>>): lane i reads item i of each run of 32 items, so a run's loads overlap rather
// than queue behind the stores, and a warp scan adds up units(t, h, w) of every item into offsets [items + 1].
// Asserts what host_grid_offsets checks, and that the units, times per_unit tokens each, add up to tokens.
template <typename Units>
__device__ void warp_grid_offsets(const int64_t* grid, int64_t stride0, int64_t stride1, int64_t items,
                                  int64_t merge_size, int64_t tokens, int64_t per_unit, Units units,
                                  int64_t* __restrict__ offsets) {
  constexpr int kLanes = 32;
  const int lane = static_cast<int>(threadIdx.x);
  int64_t carried = 0;
  if (lane == 0) {
    offsets[0] = 0;
  }
  for (int64_t first = 0; first < items; first += kLanes) {
    const int64_t i = first + lane;
    int64_t count = 0;
    if (i < items) {
      const int64_t* g = grid + i * stride0;
      const int64_t t = g[0], h = g[stride1], w = g[2 * stride1];
      CUDA_KERNEL_ASSERT_MSG(t >= 0 && h >= 0 && w >= 0 && h % merge_size == 0 && w % merge_size == 0,
                             "vlfuse: grid_thw has a negative size, or h or w not a multiple of merge_size");
      count = units(t, h, w);
    }
    for (int d = 1; d < kLanes; d *= 2) {
      const int64_t below = __shfl_up_sync(0xffffffffu, count, d);
      count += lane >= d ? below : 0;
    }
    if (i < items) {
      offsets[i + 1] = carried + count;
    }
    carried += __shfl_sync(0xffffffffu, count, kLanes - 1);
  }
  CUDA_KERNEL_ASSERT_MSG(carried * per_unit == tokens,
                         "vlfuse: grid_thw describes a different number of tokens than the tensor it goes with");
}

// The per-item offsets of a grid_thw that lives on the GPU, derived and checked there by offsets_kernel (one warp
// running warp_grid_offsets with the op's units), so no path needs a host sync. Points p.offsets into the
// [items + 1] allocation it returns, which must outlive the kernels reading it; a host grid gets an empty one.
template <typename Params>
c10::DataPtr device_offsets(Params& p, void (*offsets_kernel)(Params, int64_t*), cudaStream_t stream) {
  if (!p.grid_on_device) {
    return {};
  }
  c10::DataPtr offsets = c10::cuda::CUDACachingAllocator::get()->allocate((p.items + 1) * sizeof(int64_t));
  offsets_kernel<<<1, 32, 0, stream>>>(p, static_cast<int64_t*>(offsets.get()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.offsets = static_cast<const int64_t*>(offsets.get());
  return offsets;
}

}  // namespace vlfuse::cuda
