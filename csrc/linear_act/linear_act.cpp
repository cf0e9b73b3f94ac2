// linear_act ops: argument checks (the only ones; the Python wrapper adds none), the GEMM into a reused output
// block, and the hand-off of linear_act::Params to the CPU or CUDA epilogue kernel.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include <c10/util/accumulate.h>

#include "common/cpu_gemm.h"
#include "common/cpu_memory.h"
#include "common/dispatch.h"
#include "linear_act/linear_act.h"

VLFUSE_DECLARE_CPU_KERNEL(linear_act_cpu_kernel, const ::vlfuse::linear_act::Params&)

namespace vlfuse::linear_act {

#ifdef VLFUSE_WITH_CUDA
void linear_act_cuda_kernel(const Params& p);
#endif

namespace {

using at::Tensor;

Act parse_act(const char* op, c10::string_view name) {
  if (name == "none") {
    return Act::None;
  }
  if (name == "quick_gelu") {
    return Act::QuickGelu;
  }
  if (name == "gelu") {
    return Act::Gelu;
  }
  if (name == "gelu_tanh") {
    return Act::GeluTanh;
  }
  if (name == "silu") {
    return Act::Silu;
  }
  VLFUSE_CHECK_VALUE(false, op, "act must be one of 'none', 'quick_gelu', 'gelu', 'gelu_tanh', 'silu', got '",
                     std::string(name), "'");
  return Act::None;
}

void launch(const Params& p, const Tensor& like) {
  if (p.rows > 0 && p.cols > 0) {
    run_kernel("linear_act", like, VLFUSE_CPU_KERNEL(linear_act_cpu_kernel), VLFUSE_CUDA_KERNEL(linear_act_cuda_kernel),
               p);
  }
}

std::vector<int64_t> out_shape(const Tensor& x, int64_t cols) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = cols;
  return shape;
}

std::tuple<Tensor, Tensor> linear_act(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                      c10::string_view act_name, bool keep_preact) {
  const char* op = "linear_act";
  const Act act = parse_act(op, act_name);
  check_float_tensor(x, op, "x");
  VLFUSE_CHECK_VALUE(x.dim() >= 1, op, "x must be [..., in_features], got a 0-D tensor");
  check_float_tensor(weight, op, "weight");
  check_dim(weight, 2, op, "weight", "[out_features, in_features]");
  check_same_device(weight, "weight", x, "x", op);
  const auto dtype = x.scalar_type();
  VLFUSE_CHECK_TYPE(weight.scalar_type() == dtype, op, "weight has dtype ", weight.scalar_type(), " but x has ",
                    dtype, "; a Linear takes both in one dtype");
  const int64_t K = x.size(-1), N = weight.size(0);
  VLFUSE_CHECK_VALUE(weight.size(1) == K, op, "weight ", weight.sizes(), " takes in_features = ", weight.size(1),
                     " but x has ", K, " values per row (shape ", x.sizes(), ")");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_same_device(*bias, "bias", x, "x", op);
    VLFUSE_CHECK_TYPE(bias->scalar_type() == dtype, op, "bias has dtype ", bias->scalar_type(), " but x has ", dtype);
    VLFUSE_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, "bias must be [out_features] = [", N,
                       "], got shape ", bias->sizes());
  }

  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const Tensor x2 = x.reshape({rows, K});
  const auto options = x.options();
  // Every block is allocated in the output's shape and written through a [rows, N] view: an op output that is a
  // view could not be modified in place by the caller (autograd forbids it for views from a multi-output op).
  const auto shape = out_shape(x, N);
  // A reduced type on a CPU without its native GEMM goes through float32 sgemm (cpu::gemm_is_native); the
  // epilogue then rounds the float32 block once, as a native GEMM would.
  const bool route32 = x.is_cpu() && !cpu::gemm_is_native(dtype);
  // A GEMM that writes a reduced type itself takes the bias in its float32 accumulator, as nn.Linear's addmm does:
  // added after the GEMM's rounding, it would round every output twice (twice nn.Linear's bf16 error after a few
  // Linears). float32 blocks take the bias in the epilogue's pass, with the activation.
  const bool bias_in_gemm = has_bias && !route32 && at::isReducedFloatingType(dtype);
  Tensor b;
  if (has_bias && !bias_in_gemm) {
    b = bias->to(acc_type(dtype)).contiguous();
  }
  Tensor pre = cpu::empty_output(shape, options.dtype(route32 ? at::kFloat : dtype));
  Tensor pre2 = pre.view({rows, N});
  if (route32) {
    at::mm_out(pre2, x2.to(at::kFloat), weight.to(at::kFloat).t());
  } else if (bias_in_gemm) {
    at::addmm_out(pre2, *bias, x2, weight.t());
  } else {
    at::mm_out(pre2, x2, weight.t());
  }
  const bool keep = keep_preact && act != Act::None;
  Tensor preact = keep ? cpu::empty_output(shape, options) : at::empty({0}, options);
  Tensor out = route32 || keep ? cpu::empty_output(shape, options) : pre;

  Params p;
  p.in = pre.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.preact = keep ? preact.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.rows = rows;
  p.cols = N;
  p.in_dtype = static_cast<int8_t>(pre.scalar_type());
  p.out_dtype = static_cast<int8_t>(dtype);
  p.act = act;
  p.device_index = x.is_cuda() ? x.device().index() : -1;
  if (p.bias != nullptr || act != Act::None || route32) {
    launch(p, x);
  }
  return {out, preact};
}

Tensor linear_act_backward(const Tensor& grad_out, const Tensor& preact, c10::string_view act_name) {
  const char* op = "linear_act_backward";
  const Act act = parse_act(op, act_name);
  check_float_tensor(grad_out, op, "grad_out");
  check_same_device(preact, "preact", grad_out, "grad_out", op);
  VLFUSE_CHECK_TYPE(preact.scalar_type() == grad_out.scalar_type(), op, "preact has dtype ", preact.scalar_type(),
                    " but grad_out has ", grad_out.scalar_type());
  VLFUSE_CHECK_VALUE(preact.sizes() == grad_out.sizes(), op, "preact ", preact.sizes(),
                     " must have grad_out's shape ", grad_out.sizes(), " (as linear_act returned it)");
  VLFUSE_CHECK_VALUE(grad_out.dim() >= 1, op, "grad_out must be [..., out_features], got a 0-D tensor");
  const Tensor g = grad_out.contiguous(), pre = preact.contiguous();
  Tensor grad_in = cpu::empty_output(g.sizes(), g.options());
  Params p;
  p.in = pre.data_ptr();
  p.grad = g.data_ptr();
  p.out = grad_in.data_ptr();
  p.cols = g.size(-1);
  p.rows = p.cols == 0 ? 0 : g.numel() / p.cols;
  p.in_dtype = p.out_dtype = static_cast<int8_t>(g.scalar_type());
  p.act = act;
  p.backward = true;
  p.device_index = g.is_cuda() ? g.device().index() : -1;
  launch(p, g);
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfuse, CPU, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

#ifdef VLFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vlfuse, CUDA, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}
#endif

}  // namespace vlfuse::linear_act
