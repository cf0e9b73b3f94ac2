// A Linear followed by its activation: the per-element math shared by the CPU and CUDA epilogue kernels, and the
// parameter block that is the only link between the op front (linear_act.cpp: checks, the GEMM, allocation) and
// them.
//
// The front runs the GEMM into a block of its own (on the CPU a reused output block, whose pages are already
// mapped: a fresh block takes a page fault per 4 KiB page on every call, which can cost more than the whole
// epilogue) and the epilogue applies the activation in one pass over it. A float32 block (float32, or a reduced
// type on the float32 GEMM route) leaves the bias to the epilogue too, where addmm would first copy the broadcast
// bias into the output; a GEMM that writes bf16/fp16 takes the bias in its float32 sum (addmm), as nn.Linear
// does, so that each output is rounded once. Its backward is the activation's derivative in one pass
// (linear_act_backward) and two GEMMs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace vlfuse::linear_act {

// The activations of the Qwen vision MLPs, by the names the op takes.
enum class Act : int8_t { None = 0, QuickGelu = 1, Gelu = 2, GeluTanh = 3, Silu = 4 };

// exp, tanh and erf of one value, for the math below on the host and the device; the CPU kernels pass their
// own for at::vec vectors.
struct ScalarMath {
  template <typename T>
  C10_HOST_DEVICE static T exp(T x) {
    return std::exp(x);
  }
  template <typename T>
  C10_HOST_DEVICE static T tanh(T x) {
    return std::tanh(x);
  }
  template <typename T>
  C10_HOST_DEVICE static T erf(T x) {
    return std::erf(x);
  }
};

// The constants as HF's activations (transformers.activations) and ATen's gelu write them.
constexpr double kQuickGeluScale = 1.702;
constexpr double kSqrtHalf = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;   // sqrt(2 / pi)
constexpr double kTanhCubic = 0.044715;

template <typename M, typename T>
C10_HOST_DEVICE inline T sigmoid(T z) {
  return T(1) / (T(1) + M::exp(T(0) - z));
}

// act(x). T is a float type or an at::vec vector of one.
template <Act A, typename M, typename T>
C10_HOST_DEVICE inline T act_forward(T x) {
  if constexpr (A == Act::QuickGelu) {
    return x * sigmoid<M>(T(kQuickGeluScale) * x);
  } else if constexpr (A == Act::Silu) {
    return x * sigmoid<M>(x);
  } else if constexpr (A == Act::Gelu) {
    return T(0.5) * x * (T(1) + M::erf(x * T(kSqrtHalf)));
  } else if constexpr (A == Act::GeluTanh) {
    return T(0.5) * x * (T(1) + M::tanh(T(kSqrt2OverPi) * (x + T(kTanhCubic) * x * x * x)));
  } else {
    return x;
  }
}

// d act(x) / dx.
template <Act A, typename M, typename T>
C10_HOST_DEVICE inline T act_derivative(T x) {
  if constexpr (A == Act::QuickGelu) {
    const T s = sigmoid<M>(T(kQuickGeluScale) * x);
    return s * (T(1) + T(kQuickGeluScale) * x * (T(1) - s));
  } else if constexpr (A == Act::Silu) {
    const T s = sigmoid<M>(x);
    return s * (T(1) + x * (T(1) - s));
  } else if constexpr (A == Act::Gelu) {
    const T cdf = T(0.5) * (T(1) + M::erf(x * T(kSqrtHalf)));
    return cdf + x * T(kInvSqrt2Pi) * M::exp(T(-0.5) * x * x);
  } else if constexpr (A == Act::GeluTanh) {
    const T x2 = x * x;
    const T t = M::tanh(T(kSqrt2OverPi) * (x + T(kTanhCubic) * x2 * x));
    return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * T(kSqrt2OverPi) * (T(1) + T(3 * kTanhCubic) * x2);
  } else {
    return T(1);
  }
}

// One epilogue pass over a [rows, cols] block, forward or backward.
//   forward:  in = the GEMM's output (in_dtype; float32 where the front took the float32 GEMM route for a
//             reduced type), bias [cols] in the accumulation type or null (null too where the GEMM took the bias
//             itself); writes preact = in + bias when preact is not null (out_dtype, what the backward reads)
//             and out = act(in + bias) (out_dtype; may be `in` itself, in place).
//   backward: in = preact (out_dtype), grad [rows, cols] (out_dtype); writes out = grad * act'(preact).
// Every block is contiguous rows of `cols` elements.
struct Params {
  const void* in = nullptr;
  const void* bias = nullptr;
  const void* grad = nullptr;
  void* preact = nullptr;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int8_t in_dtype = 0;   // c10::ScalarType
  int8_t out_dtype = 0;  // c10::ScalarType
  Act act = Act::None;
  bool backward = false;
  int8_t device_index = -1;
};

}  // namespace vlfuse::linear_act
