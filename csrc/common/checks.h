// Argument checks shared by every op front: each message names the op and the argument.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vlfuse {

// TORCH_CHECK with the op's name first, so every message reads "vlfuse.<op>: <argument> ...".
#define VLFUSE_CHECK(cond, op, ...) TORCH_CHECK((cond), "vlfuse.", op, ": ", __VA_ARGS__)
#define VLFUSE_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE((cond), "vlfuse.", op, ": ", __VA_ARGS__)
#define VLFUSE_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE((cond), "vlfuse.", op, ": ", __VA_ARGS__)

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The type the kernels accumulate a float tensor's values in: float64 for float64, float32 for the rest.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  VLFUSE_CHECK_TYPE(is_supported_float(t.scalar_type()), op, name,
                    " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* shape) {
  VLFUSE_CHECK_VALUE(t.dim() == dim, op, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  VLFUSE_CHECK(a.device() == b.device(), op, a_name, " is on ", a.device(), " but ", b_name, " is on ",
               b.device(), "; all tensors must be on the same device");
}

}  // namespace vlfuse
