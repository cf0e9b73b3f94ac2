// Bilinear resampling of a learned square position table (Qwen3-VL's pos_embed, side x side entries) to each
// item's patch grid: the tap and weight math shared by the CPU and CUDA kernels, and the parameter block that is
// the only link between the op front (pos_embed.cpp: checks, allocation) and them.
//
// Output row n is the table resampled at token n's patch (row, col), F.interpolate(mode="bilinear",
// align_corners=True) of the [side, side] grid to [h, w]: along each axis of n positions, target position r reads
// source position src = r * (side - 1) / max(n - 1, 1) from its two taps floor(src) and floor(src) + 1 (clamped
// to the table) with weights 1 - frac and frac. Tokens run over items, frames (every frame repeats the same
// rows), then Qwen2-VL's merge order: m x m blocks row-major, each block's m^2 patches row-major.
//
// The float32 arithmetic is HF transformers' get_vision_interpolation_indices_and_weights step by step (one
// rounding per operation, in the same order), so the taps and weights agree with it bit for bit: the kernels
// must not fold any of it into a fused multiply-add or reorder it.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace vlfuse::pos_embed {

// The two taps of one target position on one axis: table indices (hi = lo + 1 clamped to side - 1) and weights.
template <typename I>
struct AxisTaps {
  I lo, hi;
  float w_lo, w_hi;
};

// a / b rounded to nearest, as the IEEE division computes it, for a = 0 or a >= 1 and b >= 1 (both integers
// here). On the GPU, spelled out as the fast path of nvcc's own division (MUFU.RCP, then Newton and remainder
// FMAs: the same instructions, so the same float): its slow path, for operands no call here has (zero, subnormal,
// infinite or huge divisors), is a subroutine call whose saved registers spilled in the backward kernel's loops.
C10_HOST_DEVICE inline float divide(float a, float b) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(b));
  const float e = __fmaf_rn(-b, y, 1.0f);
  const float y1 = __fmaf_rn(y, e, y);
  const float q0 = __fmul_rn(a, y1);
  const float r = __fmaf_rn(-b, q0, a);
  return __fmaf_rn(y1, r, q0);
#else
  return a / b;
#endif
}

// Taps of target position r on an axis of n positions into a table axis of `side` entries. HF computes
// src = float(r) * (side - 1) / float(max(n - 1, 1)), w_lo = 1 - |src - floor|, w_hi = 1 - |src - floor - 1|;
// |frac - 1| rounds to the same float as 1 - frac (round to nearest is symmetric), so w_hi = 1 - w_lo exactly
// as HF rounds it, which need not equal frac.
template <typename I>
C10_HOST_DEVICE inline AxisTaps<I> axis_taps(I r, I n, I side) {
  const float scaled = static_cast<float>(r) * static_cast<float>(side - 1);
  const float src = divide(scaled, static_cast<float>(n > 1 ? n - 1 : 1));
  const float floor_src = ::floorf(src);
  const float frac = src - floor_src;
  const float w_lo = 1.0f - frac;
  AxisTaps<I> taps;
  const I f = static_cast<I>(floor_src);
  taps.lo = f < 0 ? 0 : (f > side - 1 ? side - 1 : f);
  taps.hi = f + 1 < 0 ? 0 : (f + 1 > side - 1 ? side - 1 : f + 1);
  taps.w_lo = w_lo;
  taps.w_hi = 1.0f - w_lo;
  return taps;
}

// The four table rows a token reads and their weights, in HF's order: (lo, lo), (lo, hi), (hi, lo), (hi, hi)
// as (row tap, column tap); weight = row weight * column weight, rounded to float32.
template <typename I>
struct TokenTaps {
  I index[4];
  float weight[4];
};

// Patch (row, col) of position `within` of a frame w patches wide, in merge order with merge size m.
template <typename I>
C10_HOST_DEVICE inline void merge_order_position(I within, I w, I m, I& row, I& col) {
  const I mm = m * m;
  const I block = within / mm;
  const I k = within - block * mm;
  const I blocks_w = w / m;
  const I block_row = block / blocks_w;
  row = block_row * m + k / m;
  col = (block - block_row * blocks_w) * m + k % m;
}

// The inverse: position within its frame of patch (row, col).
template <typename I>
C10_HOST_DEVICE inline I merge_order_index(I row, I col, I w, I m) {
  const I block_row = row / m, in_row = row - block_row * m;
  const I block_col = col / m, in_col = col - block_col * m;
  return ((block_row * (w / m) + block_col) * m + in_row) * m + in_col;
}

// Taps of the token at `local` (its index from its item's first token) of an item whose frames are h x w patches.
template <typename I>
C10_HOST_DEVICE inline TokenTaps<I> token_taps(I local, I h, I w, I m, I side) {
  const I within = local % (h * w);
  I row, col;
  merge_order_position<I>(within, w, m, row, col);
  const AxisTaps<I> th = axis_taps<I>(row, h, side);
  const AxisTaps<I> tw = axis_taps<I>(col, w, side);
  TokenTaps<I> taps;
  taps.index[0] = th.lo * side + tw.lo;
  taps.index[1] = th.lo * side + tw.hi;
  taps.index[2] = th.hi * side + tw.lo;
  taps.index[3] = th.hi * side + tw.hi;
  taps.weight[0] = th.w_lo * tw.w_lo;
  taps.weight[1] = th.w_lo * tw.w_hi;
  taps.weight[2] = th.w_hi * tw.w_lo;
  taps.weight[3] = th.w_hi * tw.w_hi;
  return taps;
}

// ---- the backward's inverse map: which target positions read table index i -------------------------------
//
// lo(r) never decreases with r, so the targets whose lo tap is i form one range, [first(i), first(i + 1)), where
// first(i) is the smallest r with lo(r) >= i (n when there is none; first(side) = n). hi = min(lo + 1, side - 1),
// so the targets whose hi tap is i are those with lo = i - 1, and for i = side - 1 also those with lo = side - 1
// (whose hi weight is 0, kept so that a non-finite gradient spreads exactly as in HF's backward).

// first(i) for 0 <= i <= side, on an axis of n >= 1 positions: the exact-arithmetic answer ceil(i (n-1) / (side-1)),
// then moved to where the float32 taps actually change (they agree for any realistic size; the loops are the proof).
template <typename I>
C10_HOST_DEVICE inline I first_target(I i, I n, I side) {
  const I den = side > 1 ? side - 1 : 1;
  I r = (i * (n - 1) + den - 1) / den;
  r = r < 0 ? 0 : (r > n ? n : r);
  while (r > 0 && axis_taps<I>(r - 1, n, side).lo >= i) {
    --r;
  }
  while (r < n && axis_taps<I>(r, n, side).lo < i) {
    ++r;
  }
  return r;
}

// Target ranges [begin, end) whose lo tap (range 0) and hi tap (range 1) read table index i, from
// firsts = first(0 .. side) of the axis.
template <typename I>
C10_HOST_DEVICE inline void tap_ranges(const I* firsts, I i, I n, I side, I (&begin)[2], I (&end)[2]) {
  begin[0] = firsts[i];
  end[0] = firsts[i + 1];
  if (i == 0) {
    begin[1] = 0;
    end[1] = side == 1 ? n : 0;
  } else {
    begin[1] = firsts[i - 1];
    end[1] = i == side - 1 ? n : firsts[i];
  }
}

struct Params {
  // table [side * side, C] with unit stride on C; out [tokens, C] contiguous. bias [C] contiguous in acc_t
  // (float32, float64 for a float64 table), null when absent.
  const void* table = nullptr;
  int64_t table_stride = 0;
  int64_t side = 0;
  int64_t channels = 0;
  const void* bias = nullptr;
  void* out = nullptr;
  int64_t tokens = 0;
  int64_t merge_size = 2;
  // grid_thw [items, 3] as int64 (any strides) and offsets [items + 1] (an exclusive prefix sum of the tokens
  // of each item), on the kernel's device. The front computes and validates offsets for a grid_thw from the host;
  // for a grid_thw on the GPU it leaves offsets null and the CUDA code derives (and checks) them on the device,
  // without a host sync.
  const int64_t* grid = nullptr;
  int64_t grid_stride0 = 0, grid_stride1 = 0;
  const int64_t* offsets = nullptr;
  int64_t items = 0;
  bool grid_on_device = false;
  int8_t dtype = 0;  // c10::ScalarType of table, bias's source and out
  int device_index = -1;
  // Backward only: grad_out [tokens, C] (unit stride on C) and grad_table [side * side, C] contiguous, every row
  // written (rows no token reads are zero).
  const void* grad_out = nullptr;
  int64_t grad_out_stride = 0;
  void* grad_table = nullptr;
};

}  // namespace vlfuse::pos_embed
