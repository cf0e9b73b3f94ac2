// Rotary embedding: the per-element math shared by the CPU and CUDA kernels, and the parameter block that is
// the only link between the op front (rope.cpp: checks, allocation) and the kernels.
//
// Every rotation in vlfuse is written as
//   out_lo = lo * c1 - hi * s1,   out_hi = hi * c2 + lo * s2        (lo = x[i], hi = x[i + D/2])
// with per-(token, pair) coefficients. Angles give c1 = c2 = cos, s1 = s2 = sin (negated sin for the backward);
// HF's cos/sin tables give c1 = cos[i], s1 = sin[i], c2 = cos[i + D/2], s2 = sin[i + D/2], and their transpose
// for the backward. Only +, - and * are used, so the same template runs on scalars and on at::vec vectors.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace vlfuse::rope {

constexpr int kMaxAxes = 4;
constexpr int kMaxTensors = 3;

template <typename T>
C10_HOST_DEVICE inline void rotate_pair(T lo, T hi, T c1, T s1, T c2, T s2, T& out_lo, T& out_hi) {
  out_lo = lo * c1 - hi * s1;
  out_hi = hi * c2 + lo * s2;
}

// Angle of frequency pair i for one token: sum over axes of pos[a] * freqs[a, i], in acc_t and axis order,
// so a 2-axis Qwen2-VL table (one of the two terms zero) reproduces HF's float32 pos * inv_freq exactly.
// T is acc_t or a vector of it (the CPU kernel sums a vector of pairs at once); coord[a] is the token's position
// on axis a as a T, freq(a) the frequency (or frequencies) of axis a at the pair(s).
template <typename T, typename Freq>
C10_HOST_DEVICE inline T angle_sum(const T* coord, int axes, Freq freq) {
  T a = T(0);
  for (int ax = 0; ax < axes; ++ax) {
    a = a + coord[ax] * freq(ax);
  }
  return a;
}

template <typename acc_t, typename pos_t>
C10_HOST_DEVICE inline acc_t angle(const pos_t* pos, int64_t pos_stride_a, const acc_t* freqs, int64_t half,
                                   int axes, int64_t i) {
  acc_t coord[kMaxAxes];
  for (int ax = 0; ax < axes; ++ax) {
    coord[ax] = static_cast<acc_t>(pos[ax * pos_stride_a]);
  }
  return angle_sum(coord, axes, [&](int ax) { return freqs[ax * half + i]; });
}

// Coefficients of a table-driven rotation (HF's cos/sin), forward or transposed (backward).
template <typename acc_t>
C10_HOST_DEVICE inline void table_coeffs(acc_t cos_lo, acc_t sin_lo, acc_t cos_hi, acc_t sin_hi, bool inverse,
                                         acc_t& c1, acc_t& s1, acc_t& c2, acc_t& s2) {
  c1 = cos_lo;
  c2 = cos_hi;
  s1 = inverse ? -sin_hi : sin_lo;
  s2 = inverse ? -sin_lo : sin_hi;
}

// One tensor the kernel walks over: element (s, h, d) of the input sits at in + s * in_stride_s +
// h * in_stride_h + d (unit stride on d), and likewise for the output. in == out for the in-place op.
struct TensorSlot {
  const void* in = nullptr;
  void* out = nullptr;
  int64_t heads = 0;
  int64_t in_stride_s = 0, in_stride_h = 0;
  int64_t out_stride_s = 0, out_stride_h = 0;
  bool rotate = true;  // false: copied unchanged (grad_v into the v block of rope_qkv_backward's output)
};

enum class AngleSource { Freqs, Table };

struct Params {
  TensorSlot slots[kMaxTensors];
  int num_slots = 0;
  int64_t tokens = 0;
  int64_t half = 0;  // D / 2
  bool inverse = false;
  AngleSource source = AngleSource::Freqs;
  // AngleSource::Freqs: positions [S, axes] (int32 or int64) and freqs [axes, half] contiguous, in acc_t.
  const void* positions = nullptr;
  int64_t pos_stride_s = 0, pos_stride_a = 0;
  int axes = 0;
  const void* freqs = nullptr;
  // AngleSource::Table: cos, sin [S, D] in acc_t, unit stride on D.
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t cos_stride_s = 0, sin_stride_s = 0;
  // Element and position types (c10::ScalarType values, kept as ints so this header stays device-neutral).
  int8_t dtype = 0;
  int8_t pos_dtype = 0;
  int device_index = -1;
};

}  // namespace vlfuse::rope
