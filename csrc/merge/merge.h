// Norm + m x m token merge: the index math and per-element norm math shared by the CPU and CUDA kernels, and
// the parameter block that is the only link between the op front (merge.cpp: checks, allocation) and them.
//
// Output row r of [S / m^2, m^2 * C] concatenates the normalized tokens source_token(r, 0 .. m^2 - 1).
//   order "merge":  tokens are already in Qwen2-VL's patch order, so window slot k of row r is token r*m^2 + k.
//   order "raster": every frame is row-major over (h, w); rows run over items, frames, h-blocks, w-blocks and
//                   slot k = (a, b) = (k / m, k % m) is token (hb*m + a, wb*m + b) of that frame.
// With postshuffle (Qwen3-VL's deepstack mergers) the norm runs over each merged row instead of each token.
// The per-element norm formulas use only +, - and *, so one template runs on scalars and on at::vec vectors.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace vlfuse::merge {

enum class Norm : int8_t { LayerNorm = 0, RMSNorm = 1 };
enum class Order : int8_t { Merge = 0, Raster = 1 };

// y = (x - mean) * rstd * w + b  (LayerNorm; RMSNorm passes mean = 0, b = 0).
template <typename T>
C10_HOST_DEVICE inline T normalize(T x, T mean, T rstd, T w, T b) {
  return (x - mean) * rstd * w + b;
}

// Statistics from the sums of d = x - K and of d^2 over a token, for a reference K near its mean (the CUDA
// kernel's first-pass mean, the CPU kernel's estimate from the token's first elements; 0 for RMSNorm): the
// mean's correction shift = sum_d / C (mean = K + shift) and the variance. RMSNorm's "variance" is
// mean(x^2), with no shift.
template <typename T>
C10_HOST_DEVICE inline void corrected_moments(T sum_d, T sum_d2, T count, Norm norm, T& shift, T& var) {
  if (norm == Norm::LayerNorm) {
    shift = sum_d / count;
    // Clamps rounding below zero but keeps a NaN (an inf in the token makes sum_d2 / count - shift^2 = inf - inf)
    // a NaN, so that token's output is NaN as in torch's layer_norm.
    const T v = sum_d2 / count - shift * shift;
    var = v < T(0) ? T(0) : v;
  } else {
    shift = T(0);
    var = sum_d2 / count;
  }
}

// Input gradient of either norm for one element, given per-token sums over the row of
//   sum_g = sum_j dy_j w_j   and   sum_gx = sum_j dy_j w_j xhat_j   (xhat = (x - mean) * rstd):
//   LayerNorm: dx = rstd * (g - sum_g / C - xhat * sum_gx / C)
//   RMSNorm:   dx = rstd * (g - xhat * sum_gx / C)       (the caller passes mean_g = 0)
template <typename T>
C10_HOST_DEVICE inline T norm_grad_input(T g, T xhat, T rstd, T mean_g, T mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

// Where the output rows of item `item` start: offsets[item] (an exclusive prefix sum of rows per item,
// offsets[items] = S / m^2). Returns the item holding row r by binary search: the last i with offsets[i] <= r.
// I is the index type of this and the two functions below: int64_t on the CPU; the CUDA kernels pass 32-bit
// values (their launches check that the tokens fit), since a 64-bit division is a subroutine call there.
template <typename I>
C10_HOST_DEVICE inline I find_item(const int64_t* offsets, I items, I r) {
  I lo = 0, hi = items;  // invariant: offsets[lo] <= r < offsets[hi]
  while (hi - lo > 1) {
    const I mid = lo + (hi - lo) / 2;
    if (static_cast<I>(offsets[mid]) <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Token index (row of x) of window slot k of output row r in raster order, for the item whose rows start at
// row_begin and whose frames are h x w tokens. Tokens of an item start at row_begin * m^2 (m^2 per row).
template <typename I>
C10_HOST_DEVICE inline I raster_token(I r, I row_begin, I h, I w, I m, I k) {
  const I blocks_w = w / m;
  const I rows_per_frame = (h / m) * blocks_w;
  const I local = r - row_begin;
  const I frame = local / rows_per_frame;
  const I block = local - frame * rows_per_frame;
  const I hb = block / blocks_w, wb = block - hb * blocks_w;
  const I a = k / m, b = k - a * m;
  return row_begin * m * m + frame * h * w + (hb * m + a) * w + wb * m + b;
}

// The tokens of output row r's window, located once per row (raster order's item search and divisions) so
// that each slot's token is token(k) = first + (k / m) * pitch + k % m: the token index (row of x) of window
// slot k, increasing with k. Merge order has pitch m (tokens r*m^2 .. r*m^2 + m^2 - 1); raster order the
// frame's width w.
template <typename I>
struct RowWindow {
  I r, m, first, pitch;
  C10_HOST_DEVICE inline I token(I k) const {
    const I a = k / m;
    return first + a * pitch + (k - a * m);
  }
};

// The window of output row r. For raster order, grid is grid_thw [items, 3] (t, h, w) with row strides
// grid_stride and offsets its [items + 1] row prefix sums.
template <typename I>
C10_HOST_DEVICE inline RowWindow<I> row_window(Order order, I r, I m, const int64_t* grid, int64_t grid_stride0,
                                               int64_t grid_stride1, const int64_t* offsets, I items) {
  if (order == Order::Merge) {
    return {r, m, r * m * m, m};
  }
  const I item = find_item<I>(offsets, items, r);
  const int64_t* g = grid + item * grid_stride0;
  const I w = static_cast<I>(g[2 * grid_stride1]);
  return {r, m, raster_token<I>(r, static_cast<I>(offsets[item]), static_cast<I>(g[grid_stride1]), w, m, I(0)), w};
}

// Token index of window slot k of output row r.
template <typename I>
C10_HOST_DEVICE inline I source_token(Order order, I r, I k, I m, const int64_t* grid, int64_t grid_stride0,
                                      int64_t grid_stride1, const int64_t* offsets, I items) {
  if (order == Order::Merge) {
    return r * m * m + k;
  }
  return row_window<I>(order, r, m, grid, grid_stride0, grid_stride1, offsets, items).token(k);
}

struct Params {
  // x [S, C] with unit stride on C; out [S / m^2, m^2 * C] contiguous; mean, rstd [S] in acc_t, one per
  // token ([S / m^2], one per merged row, with postshuffle); mean is unused, and may be null, for RMSNorm.
  const void* x = nullptr;
  int64_t x_stride = 0;
  void* out = nullptr;
  void* mean = nullptr;
  void* rstd = nullptr;
  // weight, bias [C] ([m^2 * C] with postshuffle) contiguous in acc_t (float32, or float64 for float64
  // inputs); bias null when absent.
  const void* weight = nullptr;
  const void* bias = nullptr;
  // With postshuffle: the same weight and bias as given, when they come in x's own bfloat16/float16 type (bias
  // absent or in it too), for the CPU kernel, which reads its tables in that type. Null otherwise.
  const void* weight_reduced = nullptr;
  const void* bias_reduced = nullptr;
  int64_t tokens = 0;
  int64_t channels = 0;
  int64_t merge_size = 2;
  double eps = 1e-6;
  Norm norm = Norm::LayerNorm;
  Order order = Order::Merge;
  // Qwen3-VL's post-shuffle norm: the statistics of each merged row (all m^2 * C values of its window)
  // instead of each token's, with weight and bias over the merged row.
  bool postshuffle = false;
  // grid_thw [items, 3] as int64 (any strides) and offsets [items + 1] int64, on the kernel's device.
  // The front computes and validates offsets when grid_thw comes from the host; for a grid_thw already on the
  // GPU it leaves offsets null and the CUDA code derives (and checks) them on the device, without a host sync.
  const int64_t* grid = nullptr;
  int64_t grid_stride0 = 0, grid_stride1 = 0;
  const int64_t* offsets = nullptr;
  int64_t items = 0;
  bool grid_on_device = false;  // grid_thw was passed on the GPU: its values are checked there
  int8_t dtype = 0;  // c10::ScalarType of x and out
  int device_index = -1;
  // Backward only: grad_out [S / m^2, m^2 * C] (unit stride on its last dim), grad_x [S, C] contiguous (null
  // when not wanted), and grad_weight / grad_bias [C] ([m^2 * C] with postshuffle) in acc_t (null when not
  // wanted), each the sum over tokens of per-chunk partial sums that the kernels reduce in a fixed order
  // (deterministic for a given size).
  const void* grad_out = nullptr;
  int64_t grad_out_stride = 0;
  void* grad_x = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
};

}  // namespace vlfuse::merge
