// Norm + m x m token merge ops: argument checks (the only ones; the Python wrappers add none), output
// allocation, and the hand-off of a merge::Params block to the CPU or CUDA kernels.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

#include "common/dispatch.h"
#include "common/grid.h"
#include "common/cpu_memory.h"
#include "merge/merge.h"

VLFUSE_DECLARE_CPU_KERNEL(merge_forward_cpu_kernel, const ::vlfuse::merge::Params&)
VLFUSE_DECLARE_CPU_KERNEL(merge_backward_cpu_kernel, const ::vlfuse::merge::Params&)

namespace vlfuse::merge {

#ifdef VLFUSE_WITH_CUDA
void merge_forward_cuda(const Params& p);
void merge_backward_cuda(const Params& p);
#endif

namespace {

using at::Tensor;

Norm parse_norm(const char* op, c10::string_view norm) {
  VLFUSE_CHECK_VALUE(norm == "layernorm" || norm == "rmsnorm", op,
                     "norm must be \"layernorm\" or \"rmsnorm\", got \"", std::string(norm), "\"");
  return norm == "layernorm" ? Norm::LayerNorm : Norm::RMSNorm;
}

Order parse_order(const char* op, c10::string_view order) {
  VLFUSE_CHECK_VALUE(order == "merge" || order == "raster", op, "order must be \"merge\" or \"raster\", got \"",
                     std::string(order), "\"");
  return order == "merge" ? Order::Merge : Order::Raster;
}

// Checks x [S, C] and returns it with unit stride on C.
Tensor check_x(const char* op, const Tensor& x, int64_t merge_size) {
  check_float_tensor(x, op, "x");
  check_dim(x, 2, op, "x", "[tokens, channels]");
  VLFUSE_CHECK_VALUE(x.size(1) > 0, op, "x must have at least one channel, got shape ", x.sizes());
  VLFUSE_CHECK_VALUE(merge_size >= 1, op, "merge_size must be >= 1, got ", merge_size);
  VLFUSE_CHECK_VALUE(x.size(0) % (merge_size * merge_size) == 0, op, "x has ", x.size(0),
                     " tokens, which is not a multiple of merge_size^2 = ", merge_size * merge_size);
  return x.stride(1) == 1 ? x : x.contiguous();
}

// Checks a norm parameter, [C] or with postshuffle [m^2 * C], and returns it contiguous in acc_t (a
// negligible copy when needed).
Tensor check_param(const char* op, const Tensor& t, const char* name, const Tensor& x, int64_t merge_size,
                   bool postshuffle) {
  check_same_device(t, name, x, "x", op);
  check_float_tensor(t, op, name);
  const int64_t want = postshuffle ? merge_size * merge_size * x.size(1) : x.size(1);
  VLFUSE_CHECK_VALUE(t.dim() == 1 && t.size(0) == want, op, name,
                     postshuffle ? " must be [merge_size^2 * channels] = [" : " must be [channels] = [", want,
                     "], got shape ", t.sizes());
  return t.to(acc_type(x.scalar_type())).contiguous();
}

// Validates grid_thw [items, 3] against x and fills p's grid fields. A grid_thw on the host is checked here
// value by value, and its row offsets computed here (copied to x's device when that is a GPU). A grid_thw
// already on the GPU is read only there (no host sync): the CUDA code checks its values on the device.
// Returns the tensors that p points into; they must outlive the launch.
std::pair<Tensor, Tensor> set_grid(Params& p, const char* op, const std::optional<Tensor>& grid_opt,
                                   const Tensor& x) {
  if (!grid_opt.has_value() || !grid_opt->defined()) {
    VLFUSE_CHECK_VALUE(p.order == Order::Merge, op, "grid_thw is required for order=\"raster\", got None");
    return {};
  }
  const Tensor& grid_thw = *grid_opt;
  check_grid(op, grid_thw, x, "x");
  const int64_t m = p.merge_size;
  const int64_t items = grid_thw.size(0);
  p.items = items;
  const Tensor grid64 = grid_thw.to(at::kLong);  // on the GPU an asynchronous cast, not a host round trip
  Tensor grid = grid64;
  Tensor offsets;
  if (grid64.is_cpu()) {
    offsets = host_grid_offsets(op, grid64, m, m);
    const int64_t* off = offsets.data_ptr<int64_t>();
    VLFUSE_CHECK_VALUE(off[items] * m * m == x.size(0), op, "grid_thw describes ", off[items] * m * m,
                       " tokens (sum of t * h * w) but x has ", x.size(0), " tokens");
    if (!x.is_cpu()) {
      // Only raster order reads the grid on the device; merge order needs nothing beyond the checks above.
      offsets = p.order == Order::Raster ? offsets.to(x.device(), /*non_blocking=*/true) : Tensor();
      grid = p.order == Order::Raster ? grid64.to(x.device(), /*non_blocking=*/true) : Tensor();
    }
    p.offsets = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  }
  if (grid.defined()) {
    p.grid = grid.data_ptr<int64_t>();
    p.grid_stride0 = grid.stride(0);
    p.grid_stride1 = grid.stride(1);
  }
  p.grid_on_device = !grid_thw.is_cpu();
  return {grid, offsets};
}

void init(Params& p, const Tensor& x, int64_t merge_size, Norm norm, Order order, bool postshuffle) {
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.tokens = x.size(0);
  p.channels = x.size(1);
  p.merge_size = merge_size;
  p.norm = norm;
  p.order = order;
  p.postshuffle = postshuffle;
  p.dtype = static_cast<int8_t>(x.scalar_type());
  p.device_index = x.is_cuda() ? x.device().index() : -1;
}

std::tuple<Tensor, Tensor, Tensor> merge2x2(const Tensor& x_in, const std::optional<Tensor>& grid_thw,
                                            const Tensor& weight, const std::optional<Tensor>& bias, double eps, c10::string_view norm,
                                            c10::string_view order, int64_t merge_size, bool postshuffle_norm) {
  const char* op = "merge2x2";
  const Norm nrm = parse_norm(op, norm);
  const Order ord = parse_order(op, order);
  const Tensor x = check_x(op, x_in, merge_size);
  VLFUSE_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, "eps must be finite and >= 0, got ", eps);
  VLFUSE_CHECK_VALUE(!(nrm == Norm::RMSNorm && bias.has_value() && bias->defined()), op,
                     "bias must be None for norm=\"rmsnorm\" (RMSNorm has no bias)");
  const int64_t S = x.size(0), C = x.size(1), m = merge_size;
  Params p;
  init(p, x, m, nrm, ord, postshuffle_norm);
  p.eps = eps;
  const Tensor w = check_param(op, weight, "weight", x, m, postshuffle_norm);
  const Tensor b =
      bias.has_value() && bias->defined() ? check_param(op, *bias, "bias", x, m, postshuffle_norm) : Tensor();
  const auto keep_grid = set_grid(p, op, grid_thw, x);
  const auto stats_opts = x.options().dtype(acc_type(x.scalar_type()));
  Tensor out = cpu::empty_output({S / (m * m), m * m * C}, x.options());
  // One mean and rstd per normalized row: a token, or with postshuffle a merged row.
  const int64_t stats_rows = postshuffle_norm ? S / (m * m) : S;
  Tensor mean = at::empty({nrm == Norm::LayerNorm ? stats_rows : 0}, stats_opts);
  Tensor rstd = at::empty({stats_rows}, stats_opts);
  p.out = out.data_ptr();
  p.mean = nrm == Norm::LayerNorm ? mean.data_ptr() : nullptr;
  p.rstd = rstd.data_ptr();
  p.weight = w.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  Tensor w_reduced, b_reduced;
  if (postshuffle_norm && reduced && weight.scalar_type() == x.scalar_type() &&
      (!b.defined() || bias->scalar_type() == x.scalar_type())) {
    w_reduced = weight.contiguous();
    b_reduced = b.defined() ? bias->contiguous() : Tensor();
    p.weight_reduced = w_reduced.data_ptr();
    p.bias_reduced = b_reduced.defined() ? b_reduced.data_ptr() : nullptr;
  }
  if (S > 0) {
    run_kernel(op, x, VLFUSE_CPU_KERNEL(merge_forward_cpu_kernel), VLFUSE_CUDA_KERNEL(merge_forward_cuda), p);
  }
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> merge2x2_backward(const Tensor& grad_out_in, const Tensor& x_in,
                                                     const std::optional<Tensor>& grid_thw,
                                                     const Tensor& weight,
                                                     const Tensor& mean, const Tensor& rstd, c10::string_view norm,
                                                     c10::string_view order, int64_t merge_size,
                                                     std::array<bool, 3> output_mask, bool postshuffle_norm) {
  const char* op = "merge2x2_backward";
  const Norm nrm = parse_norm(op, norm);
  const Order ord = parse_order(op, order);
  const Tensor x = check_x(op, x_in, merge_size);
  const int64_t S = x.size(0), C = x.size(1), m = merge_size;
  check_same_device(grad_out_in, "grad_out", x, "x", op);
  VLFUSE_CHECK_TYPE(grad_out_in.scalar_type() == x.scalar_type(), op, "grad_out has dtype ",
                    grad_out_in.scalar_type(), " but x has ", x.scalar_type());
  VLFUSE_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == S / (m * m) &&
                         grad_out_in.size(1) == m * m * C,
                     op, "grad_out must be [tokens / merge_size^2, merge_size^2 * channels] = [", S / (m * m), ", ",
                     m * m * C, "], got shape ", grad_out_in.sizes());
  const Tensor grad_out = grad_out_in.stride(1) == 1 ? grad_out_in : grad_out_in.contiguous();
  const auto acc = acc_type(x.scalar_type());
  const Tensor* stats[2] = {&mean, &rstd};
  const char* stat_names[2] = {"mean", "rstd"};
  for (int i = 0; i < 2; ++i) {
    const int64_t want = i == 0 && nrm == Norm::RMSNorm ? 0 : postshuffle_norm ? S / (m * m) : S;
    check_same_device(*stats[i], stat_names[i], x, "x", op);
    VLFUSE_CHECK_VALUE(stats[i]->scalar_type() == acc && stats[i]->dim() == 1 && stats[i]->size(0) == want, op,
                       stat_names[i], " must be [", want, "] ", acc, " (as returned by merge2x2), got ",
                       stats[i]->scalar_type(), " of shape ", stats[i]->sizes());
  }
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  Params p;
  init(p, x, m, nrm, ord, postshuffle_norm);
  const Tensor w = check_param(op, weight, "weight", x, m, postshuffle_norm);
  const auto keep_grid = set_grid(p, op, grid_thw, x);
  Tensor grad_x = output_mask[0] ? cpu::empty_output({S, C}, x.options()) : at::empty({0}, x.options());
  const int64_t param_size = w.size(0);
  Tensor grad_w = at::empty({output_mask[1] ? param_size : 0}, w.options());
  Tensor grad_b = at::empty({output_mask[2] ? param_size : 0}, w.options());
  p.weight = w.data_ptr();
  p.mean = nrm == Norm::LayerNorm ? mean_c.data_ptr() : nullptr;
  p.rstd = rstd_c.data_ptr();
  p.grad_out = grad_out.data_ptr();
  p.grad_out_stride = grad_out.stride(0);
  p.grad_x = output_mask[0] ? grad_x.data_ptr() : nullptr;
  p.grad_weight = output_mask[1] ? grad_w.data_ptr() : nullptr;
  p.grad_bias = output_mask[2] ? grad_b.data_ptr() : nullptr;
  if (S == 0) {
    grad_w.zero_();
    grad_b.zero_();
  } else {
    run_kernel(op, x, VLFUSE_CPU_KERNEL(merge_backward_cpu_kernel), VLFUSE_CUDA_KERNEL(merge_backward_cuda), p);
  }
  return {grad_x, grad_w.to(weight.scalar_type()), grad_b.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfuse, CPU, m) {
  m.impl("merge2x2", &merge2x2);
  m.impl("merge2x2_backward", &merge2x2_backward);
}

#ifdef VLFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vlfuse, CUDA, m) {
  m.impl("merge2x2", &merge2x2);
  m.impl("merge2x2_backward", &merge2x2_backward);
}
#endif

}  // namespace vlfuse::merge
