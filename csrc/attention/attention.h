// Attention within packed segments: the softmax bookkeeping shared by the kernels, and the parameter block that is
// the only link between the op front (attention.cpp: checks, allocation) and the CPU kernel.
//
// Tokens [0, S) are cut into segments (one image, one frame, one window); each token attends to the tokens of its
// own segment only. The segments come as runs of equal length: (first token, segment count, segment length).
// The kernels are flash-attention style: a block of query rows meets the segment's keys a block at a time, with a
// running maximum m and running sum l of exp(score - m) per row, so no [L, L] score matrix is ever stored.
// On CUDA the packed-segment attention is ATen's flash attention (python/vlfuse/nn/attention.py), not a kernel here.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace vlfuse::attention {

// Factor by which a row's sum and output so far shrink when its running maximum rises from m_old to m_new
// (m_new >= m_old). A row starts at m_old = -inf: nothing accumulated, factor 0 (never exp(nan)).
C10_HOST_DEVICE inline float rescale_factor(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : ::expf(m_old - m_new);
}

// The row's log-sum-exp of its scaled scores, saved for the backward pass (ATen's flash-attention convention).
C10_HOST_DEVICE inline float row_logsumexp(float m, float l) { return m + ::logf(l); }

struct Params {
  const void* q = nullptr;  // [H, S, D], unit stride over D
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride_h = 0, q_stride_s = 0;
  int64_t k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_h = 0, v_stride_s = 0;
  void* out = nullptr;      // [S, H * D], contiguous
  float* lse = nullptr;     // [H, S], contiguous
  const int64_t* groups = nullptr;  // num_groups x (first token, segment count, segment length)
  int64_t num_groups = 0;
  int64_t heads = 0;
  int64_t tokens = 0;
  int64_t head_dim = 0;
  float scale = 1.f;
  int8_t dtype = 0;  // c10::ScalarType
};

}  // namespace vlfuse::attention
