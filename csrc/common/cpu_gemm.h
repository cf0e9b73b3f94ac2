// Whether ATen's CPU GEMM is fast for a reduced float type, and the float32 route the fronts take when it is not.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace vlfuse::cpu {

inline bool ask_aten(const char* op_name) {
  const auto op = c10::Dispatcher::singleton().findSchema({op_name, ""});
  return op.has_value() && op->typed<bool()>().call();
}

// Whether ATen's CPU GEMM has a fast (oneDNN) kernel for this dtype, asked of ATen itself. Without one
// (bf16 needs AVX-512, fp16 AVX512-FP16 or AMX-FP16) a bf16/fp16 at::mm runs a scalar fallback several times
// slower than float32 sgemm on the same CPU. Where it has none, the fronts multiply the same inputs (rounded to
// the dtype) through float32 sgemm and round once at the end: what a native reduced-precision GEMM with float32
// accumulation computes, at sgemm speed.
inline bool gemm_is_native(at::ScalarType t) {
  static const bool bf16 = ask_aten("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = ask_aten("mkldnn::_is_mkldnn_fp16_supported");
  return t == at::kBFloat16 ? bf16 : t == at::kHalf ? fp16 : true;
}

}  // namespace vlfuse::cpu
