// grid_thw [items, 3] (t, h, w in patches per image or video), the argument of every op that reads a grid: the
// checks shared by the op fronts, and the per-item prefix sums a host grid gives.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/checks.h"

namespace vlfuse {

// grid_thw lives on like's device or on the CPU, is int64 or int32 and is [items, 3]; like_name names like.
inline void check_grid(const char* op, const at::Tensor& grid_thw, const at::Tensor& like, const char* like_name) {
  VLFUSE_CHECK(grid_thw.device() == like.device() || grid_thw.is_cpu(), op, "grid_thw is on ", grid_thw.device(),
               " but ", like_name, " is on ", like.device(), "; grid_thw must be on ", like_name,
               "'s device or on the CPU");
  VLFUSE_CHECK_TYPE(grid_thw.scalar_type() == at::kLong || grid_thw.scalar_type() == at::kInt, op,
                    "grid_thw must be int64 or int32, got ", grid_thw.scalar_type());
  VLFUSE_CHECK_VALUE(grid_thw.dim() == 2 && grid_thw.size(1) == 3, op,
                     "grid_thw must be [items, 3] (t, h, w per image or video), got shape ", grid_thw.sizes());
}

// A host grid (int64, [items, 3]) checked row by row (no negative size; h and w multiples of merge_size) and its
// [items + 1] prefix sums of t * (h / per_side) * (w / per_side): per_side 1 counts tokens, merge_size counts merge
// units. The CUDA side's warp_grid_offsets computes the same on the device for a grid that lives there.
inline at::Tensor host_grid_offsets(const char* op, const at::Tensor& grid64, int64_t merge_size, int64_t per_side) {
  const int64_t items = grid64.size(0);
  const auto acc = grid64.accessor<int64_t, 2>();
  at::Tensor offsets = at::empty({items + 1}, grid64.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t i = 0; i < items; ++i) {
    const int64_t t = acc[i][0], h = acc[i][1], w = acc[i][2];
    VLFUSE_CHECK_VALUE(t >= 0 && h >= 0 && w >= 0, op, "grid_thw row ", i, " = (", t, ", ", h, ", ", w,
                       ") has a negative size");
    VLFUSE_CHECK_VALUE(h % merge_size == 0 && w % merge_size == 0, op, "grid_thw row ", i, " = (", t, ", ", h, ", ",
                       w, ") has h or w not a multiple of merge_size = ", merge_size);
    off[i + 1] = off[i] + t * (h / per_side) * (w / per_side);
  }
  return offsets;
}

}  // namespace vlfuse
