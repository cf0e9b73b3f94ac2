// Learned position table resampling ops: argument checks (the only ones; the Python wrappers add none), output
// allocation, and the hand-off of a pos_embed::Params block to the CPU or CUDA kernels.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <utility>

#include "common/cpu_memory.h"
#include "common/dispatch.h"
#include "common/grid.h"
#include "pos_embed/pos_embed.h"

VLFUSE_DECLARE_CPU_KERNEL(pos_embed_forward_cpu_kernel, const ::vlfuse::pos_embed::Params&)
VLFUSE_DECLARE_CPU_KERNEL(pos_embed_backward_cpu_kernel, const ::vlfuse::pos_embed::Params&)

namespace vlfuse::pos_embed {

#ifdef VLFUSE_WITH_CUDA
void pos_embed_forward_cuda(const Params& p);
void pos_embed_backward_cuda(const Params& p);
#endif

namespace {

using at::Tensor;

// The table's side: its rows must be a square number.
int64_t table_side(const char* op, const Tensor& table) {
  const int64_t rows = table.size(0);
  int64_t side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(rows))));
  while (side * side > rows) {
    --side;
  }
  while ((side + 1) * (side + 1) <= rows) {
    ++side;
  }
  VLFUSE_CHECK_VALUE(rows > 0 && side * side == rows, op,
                     "table must have side * side rows (a square grid of learned positions), got ", rows, " rows");
  return side;
}

// Validates grid_thw [items, 3] for the tensor `like` (named like_name) and fills p's grid fields and p.tokens.
// A grid_thw on the host is checked here value by value and its token offsets computed here (copied to like's
// device when that is a GPU); its token count must equal `tokens` (named tokens_name) when that is given. A
// grid_thw on the GPU is read only there (no host sync): `tokens` must then be given, and the CUDA code checks
// the grid's values against it on the device. Returns the tensors that p points into; they must outlive the
// launch.
std::pair<Tensor, Tensor> set_grid(Params& p, const char* op, const Tensor& grid_thw, const Tensor& like,
                                   const char* like_name, std::optional<int64_t> tokens, const char* tokens_name) {
  check_grid(op, grid_thw, like, like_name);
  VLFUSE_CHECK_VALUE(!tokens.has_value() || *tokens >= 0, op, "tokens must be >= 0, got ", tokens.value_or(0));
  const int64_t m = p.merge_size;
  const int64_t items = grid_thw.size(0);
  p.items = items;
  const Tensor grid64 = grid_thw.to(at::kLong);  // on the GPU an asynchronous cast, not a host round trip
  Tensor grid = grid64;
  Tensor offsets;
  if (grid64.is_cpu()) {
    offsets = host_grid_offsets(op, grid64, m, 1);
    const int64_t* off = offsets.data_ptr<int64_t>();
    VLFUSE_CHECK_VALUE(!tokens.has_value() || *tokens == off[items], op, tokens_name, " = ", tokens.value_or(0),
                       " but grid_thw describes ", off[items], " tokens (sum of t * h * w)");
    p.tokens = off[items];
    if (!like.is_cpu()) {
      offsets = offsets.to(like.device(), /*non_blocking=*/true);
      grid = grid64.to(like.device(), /*non_blocking=*/true);
    }
    p.offsets = offsets.data_ptr<int64_t>();
  } else {
    VLFUSE_CHECK_VALUE(tokens.has_value(), op, "grid_thw is on ", grid_thw.device(),
                       ": pass tokens (its sum of t * h * w) so that the output size is known without reading "
                       "grid_thw on the host");
    p.tokens = *tokens;
  }
  p.grid = grid.data_ptr<int64_t>();
  p.grid_stride0 = grid.stride(0);
  p.grid_stride1 = grid.stride(1);
  p.grid_on_device = !grid_thw.is_cpu();
  return {grid, offsets};
}

void check_merge_size(const char* op, int64_t merge_size) {
  VLFUSE_CHECK_VALUE(merge_size >= 1, op, "merge_size must be >= 1, got ", merge_size);
}

Tensor interp_pos_embed(const Tensor& table_in, const Tensor& grid_thw, int64_t merge_size,
                        const std::optional<Tensor>& bias, std::optional<int64_t> tokens) {
  const char* op = "interp_pos_embed";
  check_float_tensor(table_in, op, "table");
  check_dim(table_in, 2, op, "table", "[side * side, channels]");
  VLFUSE_CHECK_VALUE(table_in.size(1) > 0, op, "table must have at least one channel, got shape ", table_in.sizes());
  const int64_t side = table_side(op, table_in);
  check_merge_size(op, merge_size);
  const Tensor table = table_in.stride(1) == 1 ? table_in : table_in.contiguous();
  const int64_t C = table.size(1);
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    check_same_device(*bias, "bias", table, "table", op);
    VLFUSE_CHECK_TYPE(bias->scalar_type() == table.scalar_type(), op, "bias has dtype ", bias->scalar_type(),
                      " but table has ", table.scalar_type());
    VLFUSE_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, op, "bias must be [channels] = [", C, "], got shape ",
                       bias->sizes());
    b = bias->to(acc_type(table.scalar_type())).contiguous();
  }
  Params p;
  p.merge_size = merge_size;
  const auto keep_grid = set_grid(p, op, grid_thw, table, "table", tokens, "tokens");
  Tensor out = cpu::empty_output({p.tokens, C}, table.options());
  p.table = table.data_ptr();
  p.table_stride = table.stride(0);
  p.side = side;
  p.channels = C;
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.dtype = static_cast<int8_t>(table.scalar_type());
  p.device_index = table.is_cuda() ? table.device().index() : -1;
  run_kernel(op, table, VLFUSE_CPU_KERNEL(pos_embed_forward_cpu_kernel), VLFUSE_CUDA_KERNEL(pos_embed_forward_cuda),
             p);
  return out;
}

Tensor interp_pos_embed_backward(const Tensor& grad_out_in, const Tensor& grid_thw, int64_t side,
                                 int64_t merge_size) {
  const char* op = "interp_pos_embed_backward";
  check_float_tensor(grad_out_in, op, "grad_out");
  check_dim(grad_out_in, 2, op, "grad_out", "[tokens, channels]");
  VLFUSE_CHECK_VALUE(side >= 1, op, "side must be >= 1, got ", side);
  check_merge_size(op, merge_size);
  const Tensor grad_out = grad_out_in.stride(1) == 1 ? grad_out_in : grad_out_in.contiguous();
  const int64_t C = grad_out.size(1);
  Params p;
  p.merge_size = merge_size;
  const auto keep_grid = set_grid(p, op, grid_thw, grad_out, "grad_out", grad_out.size(0), "grad_out.size(0)");
  Tensor grad_table = at::empty({side * side, C}, grad_out.options());
  p.side = side;
  p.channels = C;
  p.grad_out = grad_out.data_ptr();
  p.grad_out_stride = grad_out.stride(0);
  p.grad_table = grad_table.data_ptr();
  p.dtype = static_cast<int8_t>(grad_out.scalar_type());
  p.device_index = grad_out.is_cuda() ? grad_out.device().index() : -1;
  run_kernel(op, grad_out, VLFUSE_CPU_KERNEL(pos_embed_backward_cpu_kernel),
             VLFUSE_CUDA_KERNEL(pos_embed_backward_cuda), p);
  return grad_table;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfuse, CPU, m) {
  m.impl("interp_pos_embed", &interp_pos_embed);
  m.impl("interp_pos_embed_backward", &interp_pos_embed_backward);
}

#ifdef VLFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vlfuse, CUDA, m) {
  m.impl("interp_pos_embed", &interp_pos_embed);
  m.impl("interp_pos_embed_backward", &interp_pos_embed_backward);
}
#endif

}  // namespace vlfuse::pos_embed
