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

// Position of the top-left patch of merge window `window` (counted over the item's windows, temporal pair
// major) in an item of grid_h x grid_w patches per temporal pair. I is the index type: int64_t on the CPU;
// the CUDA kernel passes 32-bit values (its launches are limited to 2^31 patches) to avoid 64-bit division.
template <typename I>
C10_HOST_DEVICE inline PatchPosition window_origin(I window, I grid_h, I grid_w, I merge) {
  const I blocks_w = grid_w / merge;
  const I per_pair = grid_h / merge * blocks_w;
  const I t = window / per_pair;
  const I block = window - t * per_pair;
  const I hb = block / blocks_w;
  const I wb = block - hb * blocks_w;
  return {static_cast<int64_t>(t), static_cast<int64_t>(hb * merge), static_cast<int64_t>(wb * merge)};
}

// Position of the patch with index `local` within an item of grid_h x grid_w patches per temporal pair.
C10_HOST_DEVICE inline PatchPosition patch_position(int64_t local, int64_t grid_h, int64_t grid_w, int64_t merge) {
  const int64_t window_size = merge * merge;
  const int64_t window = local / window_size;
  const int64_t k = local - window * window_size;
  PatchPosition pos = window_origin<int64_t>(window, grid_h, grid_w, merge);
  pos.ph += k / merge;
  pos.pw += k % merge;
  return pos;
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

// patch_embed's CPU look at its input rows: a row whose Tp frames are bitwise equal (an image, which HF's processors
// repeat to Tp frames, or the repeated last frame of an odd video) has x . W = x_0 . (W_0 + ... + W_{Tp-1}), so its
// GEMM can run over C * P * P values instead of C * Tp * P * P. Rows are [count, C * Tp * plane] of any element type
// (compared as bytes), each one contiguous.
struct EqualFramesParams {
  const void* rows = nullptr;
  int64_t row_stride = 0;  // in elements
  int64_t count = 0;
  int64_t channels = 0;
  int64_t temporal = 0;
  int64_t plane = 0;  // P * P
  int64_t elem_size = 0;
  void* first_frames = nullptr;  // [count, C * plane] contiguous: frame 0 of each row found equal, the rest untouched
  uint8_t* equal = nullptr;      // [count]: 1 where the row's frames are equal
};

// The Conv3d weight those rows take: out[r, :] = sum over t of weight[r, t, :], for r over E * C, summed in the
// accumulation type and rounded once. weight [E * C, Tp, plane] and out [E * C, plane] contiguous. A sum that is
// not finite (a float16 weight whose taps add past 65504, or a weight holding inf or NaN) sets *not_finite: the
// rows then keep the unfolded GEMM, whose float32 accumulation holds what the rounded sum cannot.
struct FoldedWeightParams {
  const void* weight = nullptr;
  void* out = nullptr;
  bool* not_finite = nullptr;  // set (atomically) by any thread that meets such a sum; never cleared
  int64_t rows = 0;
  int64_t temporal = 0;
  int64_t plane = 0;
  int8_t dtype = 0;
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
