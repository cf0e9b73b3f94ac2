// Temporal patchify: the index math shared by the CPU and CUDA packing kernels, and the parameter block that is
// the only link between the op front (patchify.cpp: checks, allocation) and the kernels.
//
// Output row n is one patch, a [C, Tp, P, P] block flattened (channel, frame, row, column), as Qwen2-VL's
// processors emit it and its Conv3d weight expects. Within one item of grid (t, h, w) in patches, rows run
// over temporal pairs, then h-blocks, w-blocks of merge size m, then the m x m window row-major, so that the
// later 2 x 2 merge reads m * m consecutive rows. Frame f of a pair is min(t * Tp + tp, T - 1): an odd video
// repeats its last frame and an image (T = 1) becomes Tp equal frames.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace vlfuse::patchify {

// Items (images or videos) handed to one kernel launch; longer lists are packed in several launches.
// Kept small enough that Params travels as a CUDA kernel argument (4 KiB limit).
constexpr int kMaxItems = 32;
// Channels whose normalization constants travel in Params (grey, RGB, RGBA).
constexpr int kMaxChannels = 4;

// Spatial origin (top-left patch) and temporal pair of one patch of an item.
struct PatchPosition {
  int64_t t;   // temporal pair
  int64_t ph;  // patch row (in patches)
  int64_t pw;  // patch column (in patches)
};

// Position of the patch with index `local` within an item of grid_h x grid_w patches per temporal pair.
C10_HOST_DEVICE inline PatchPosition patch_position(int64_t local, int64_t grid_h, int64_t grid_w, int64_t merge) {
  const int64_t window_size = merge * merge;
  const int64_t per_pair = grid_h * grid_w;
  const int64_t t = local / per_pair;
  const int64_t r = local - t * per_pair;
  const int64_t block = r / window_size;
  const int64_t window = r - block * window_size;
  const int64_t blocks_w = grid_w / merge;
  const int64_t hb = block / blocks_w;
  const int64_t wb = block - hb * blocks_w;
  return {t, hb * merge + window / merge, wb * merge + window % merge};
}

// Coordinates of element e of a patch vector [C, Tp, P, P].
struct PatchElement {
  int64_t c, tp, py, px;
};

C10_HOST_DEVICE inline PatchElement patch_element(int64_t e, int64_t temporal, int64_t patch) {
  const int64_t px = e % patch;
  int64_t r = e / patch;
  const int64_t py = r % patch;
  r /= patch;
  return {r / temporal, r % temporal, py, px};
}

// Frame read for frame tp of temporal pair t of an item with `frames` frames (the last one repeats).
C10_HOST_DEVICE inline int64_t source_frame(int64_t t, int64_t tp, int64_t temporal, int64_t frames) {
  const int64_t f = t * temporal + tp;
  return f < frames ? f : frames - 1;
}

// (pixel * rescale - mean) / std folded into one multiply-add; scale = rescale / std, shift = -mean / std.
// Only * and + are used, so the same template runs on scalars and on at::vec vectors.
template <typename T>
C10_HOST_DEVICE inline T normalize(T pixel, T scale, T shift) {
  return pixel * scale + shift;
}

// One image or video: element (f, c, y, x) of its frames sits at frames + f * stride_t + c * stride_c +
// y * stride_h + x * stride_w. Its patches are rows [first_patch, first_patch + patches) of the launch's output.
struct Item {
  const void* frames = nullptr;
  int64_t stride_t = 0, stride_c = 0, stride_h = 0, stride_w = 0;
  int64_t num_frames = 0;
  int64_t grid_h = 0, grid_w = 0;  // in patches
  int64_t first_patch = 0;
  int64_t patches = 0;
};

struct Params {
  Item items[kMaxItems];
  int num_items = 0;
  void* out = nullptr;  // [patches, C * Tp * P * P] of this launch, contiguous
  int64_t patches = 0;
  int64_t channels = 0;
  int64_t patch = 0;     // P
  int64_t temporal = 0;  // Tp
  int64_t merge = 0;     // m
  double scale[kMaxChannels] = {};
  double shift[kMaxChannels] = {};
  // Element types (c10::ScalarType values, kept as ints so this header stays device-neutral).
  int8_t in_dtype = 0;
  int8_t out_dtype = 0;
  int device_index = -1;

  C10_HOST_DEVICE int64_t patch_elems() const {
    return channels * temporal * patch * patch;
  }
};

// Index of the item holding patch n of the launch, searching forward from item `from`.
C10_HOST_DEVICE inline int item_of(const Params& p, int64_t n, int from) {
  int i = from;
  while (i + 1 < p.num_items && n >= p.items[i + 1].first_patch) {
    ++i;
  }
  return i;
}

}  // namespace vlfuse::patchify
