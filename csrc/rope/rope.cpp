// Rotary embedding ops: argument checks (the only ones; the Python wrappers add none), output allocation,
// and the hand-off of a rope::Params block to the CPU or CUDA kernel.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <optional>

#include "common/dispatch.h"
#include "common/cpu_memory.h"
#include "rope/rope.h"

VLFUSE_DECLARE_CPU_KERNEL(rope_cpu_kernel, const ::vlfuse::rope::Params&)

namespace vlfuse::rope {

#ifdef VLFUSE_WITH_CUDA
void rope_cuda_kernel(const Params& p);
#endif

namespace {

using at::Tensor;

void launch(const Params& p, const Tensor& like) {
  if (p.tokens > 0) {
    run_kernel("rope", like, VLFUSE_CPU_KERNEL(rope_cpu_kernel), VLFUSE_CUDA_KERNEL(rope_cuda_kernel), p);
  }
}

// Checks positions [S, A] and freqs [A, D/2] and fills the angle part of p. Returns freqs in acc_t,
// contiguous (a few hundred bytes), which must outlive the launch.
Tensor set_angle_source(Params& p, const char* op, const Tensor& positions, const Tensor& freqs, int64_t tokens,
                        int64_t head_dim, const Tensor& x, const char* x_name) {
  check_same_device(positions, "positions", x, x_name, op);
  check_same_device(freqs, "freqs", x, x_name, op);
  VLFUSE_CHECK_TYPE(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, op,
                    "positions must be int64 or int32, got ", positions.scalar_type());
  VLFUSE_CHECK_VALUE(positions.dim() == 2, op, "positions must be 2-D [tokens, axes], got shape ",
                     positions.sizes());
  VLFUSE_CHECK_VALUE(positions.size(0) == tokens, op, "positions has ", positions.size(0), " rows but ", x_name,
                     " has ", tokens, " tokens");
  const int64_t axes = positions.size(1);
  VLFUSE_CHECK_VALUE(axes >= 1 && axes <= kMaxAxes, op, "positions must have 1 to ", kMaxAxes,
                     " axes (columns), got ", axes);
  VLFUSE_CHECK_TYPE(freqs.scalar_type() == at::kFloat || freqs.scalar_type() == at::kDouble, op,
                    "freqs must be float32 (or float64), got ", freqs.scalar_type());
  VLFUSE_CHECK_VALUE(freqs.dim() == 2 && freqs.size(0) == axes && freqs.size(1) == head_dim / 2, op,
                     "freqs must be [axes, head_dim / 2] = [", axes, ", ", head_dim / 2, "], got shape ",
                     freqs.sizes());
  Tensor f = freqs.to(acc_type(x.scalar_type())).contiguous();
  p.source = AngleSource::Freqs;
  p.positions = positions.data_ptr();
  p.pos_stride_s = positions.stride(0);
  p.pos_stride_a = positions.stride(1);
  p.axes = static_cast<int>(axes);
  p.freqs = f.data_ptr();
  p.pos_dtype = static_cast<int8_t>(positions.scalar_type());
  return f;
}

// q [S, Hq, D] / k [S, Hk, D]: float, 3-D, same tokens and head_dim, unit stride on D (made so when not).
// ref: the tensor t must agree with (q, or the first gradient), or nullptr for that first one.
Tensor check_qk(const char* op, const Tensor& t, const char* name, const Tensor* ref) {
  check_float_tensor(t, op, name);
  check_dim(t, 3, op, name, "[tokens, heads, head_dim]");
  if (ref != nullptr) {
    const Tensor& q = *ref;
    check_same_device(t, name, q, "q", op);
    VLFUSE_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, name, " has dtype ", t.scalar_type(),
                      " but q has ", q.scalar_type());
    VLFUSE_CHECK_VALUE(t.size(0) == q.size(0) && t.size(2) == q.size(2), op, name, " must be [tokens, heads, ",
                       q.size(2), "] with ", q.size(0), " tokens like q, got shape ", t.sizes());
  }
  VLFUSE_CHECK_VALUE(t.size(2) % 2 == 0 && t.size(2) > 0, op, "head_dim (last dimension of ", name,
                     ") must be even and positive, got ", t.size(2));
  return t.stride(2) == 1 ? t : t.contiguous();
}

void set_slot(Params& p, const Tensor& in, const Tensor& out, bool rotate) {
  TensorSlot& s = p.slots[p.num_slots++];
  s.in = in.data_ptr();
  s.out = out.data_ptr();
  s.heads = in.size(1);
  s.in_stride_s = in.stride(0);
  s.in_stride_h = in.stride(1);
  s.out_stride_s = out.stride(0);
  s.out_stride_h = out.stride(1);
  s.rotate = rotate;
}

void init(Params& p, const Tensor& x, int64_t tokens, int64_t head_dim, bool inverse) {
  p.tokens = tokens;
  p.half = head_dim / 2;
  p.inverse = inverse;
  p.dtype = static_cast<int8_t>(x.scalar_type());
  p.device_index = x.is_cuda() ? x.device().index() : -1;
}

// [S, H, D] view of a layout-ed tensor ("shd": [S, H, D], "hsd": [H, S, D]).
Tensor as_shd(const Tensor& t, bool hsd) {
  return hsd ? t.transpose(0, 1) : t;
}

bool parse_layout(const char* op, c10::string_view layout) {
  VLFUSE_CHECK_VALUE(layout == "shd" || layout == "hsd", op, "out_layout must be \"shd\" or \"hsd\", got \"",
                     std::string(layout), "\"");
  return layout == "hsd";
}

std::tuple<Tensor, Tensor> rope_qkv(const Tensor& qkv_in, const Tensor& positions, const Tensor& freqs,
                                    int64_t num_heads, c10::string_view out_layout) {
  const char* op = "rope_qkv";
  const bool hsd = parse_layout(op, out_layout);
  check_float_tensor(qkv_in, op, "qkv");
  check_dim(qkv_in, 2, op, "qkv", "[tokens, 3 * heads * head_dim]");
  VLFUSE_CHECK_VALUE(num_heads > 0, op, "num_heads must be positive, got ", num_heads);
  const int64_t width = qkv_in.size(1);
  VLFUSE_CHECK_VALUE(width % (3 * num_heads) == 0 && width > 0, op,
                     "last dimension of qkv must be 3 * num_heads * head_dim = 3 * ", num_heads,
                     " * head_dim, got ", width);
  const int64_t head_dim = width / (3 * num_heads);
  VLFUSE_CHECK_VALUE(head_dim % 2 == 0, op, "head_dim = qkv.size(1) / (3 * num_heads) must be even, got ",
                     head_dim);
  const Tensor qkv = qkv_in.stride(1) == 1 ? qkv_in : qkv_in.contiguous();
  const int64_t S = qkv.size(0);
  Params p;
  init(p, qkv, S, head_dim, false);
  Tensor f = set_angle_source(p, op, positions, freqs, S, head_dim, qkv, "qkv");
  auto shape = hsd ? std::vector<int64_t>{num_heads, S, head_dim} : std::vector<int64_t>{S, num_heads, head_dim};
  Tensor q = cpu::empty_output(shape, qkv.options());
  Tensor k = cpu::empty_output(shape, qkv.options());
  const Tensor parts = qkv.view({S, 3, num_heads, head_dim});
  set_slot(p, parts.select(1, 0), as_shd(q, hsd), true);
  set_slot(p, parts.select(1, 1), as_shd(k, hsd), true);
  launch(p, qkv);
  return {q, k};
}

Tensor rope_qkv_backward(const Tensor& grad_q, const Tensor& grad_k, const std::optional<Tensor>& grad_v,
                         const Tensor& positions, const Tensor& freqs, c10::string_view out_layout) {
  const char* op = "rope_qkv_backward";
  const bool hsd = parse_layout(op, out_layout);
  const Tensor gq = check_qk(op, as_shd(grad_q, hsd), "grad_q", nullptr);
  const Tensor gk = check_qk(op, as_shd(grad_k, hsd), "grad_k", &gq);
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  const Tensor gv = has_gv ? check_qk(op, as_shd(*grad_v, hsd), "grad_v", &gq) : Tensor();
  VLFUSE_CHECK_VALUE(gk.size(1) == gq.size(1) && (!has_gv || gv.size(1) == gq.size(1)), op,
                     "grad_q, grad_k and grad_v must have the same number of heads");
  const int64_t S = gq.size(0), H = gq.size(1), D = gq.size(2);
  Params p;
  init(p, gq, S, D, true);
  Tensor f = set_angle_source(p, op, positions, freqs, S, D, gq, "grad_q");
  Tensor grad_qkv = cpu::empty_output({S, 3 * H * D}, gq.options());
  const Tensor parts = grad_qkv.view({S, 3, H, D});
  set_slot(p, gq, parts.select(1, 0), true);
  set_slot(p, gk, parts.select(1, 1), true);
  if (has_gv) {
    set_slot(p, gv, parts.select(1, 2), false);
  }
  launch(p, gq);
  if (!has_gv) {
    parts.select(1, 2).zero_();
  }
  return grad_qkv;
}

void check_no_overlap(const char* op, const Tensor& q, const Tensor& k) {
  VLFUSE_CHECK_VALUE(at::has_internal_overlap(q) != at::MemOverlap::Yes, op,
                     "q has overlapping memory (e.g. a zero stride from expand()); an in-place rotation needs "
                     "distinct elements: pass q.contiguous()");
  VLFUSE_CHECK_VALUE(at::has_internal_overlap(k) != at::MemOverlap::Yes, op,
                     "k has overlapping memory (e.g. a zero stride from expand()); an in-place rotation needs "
                     "distinct elements: pass k.contiguous()");
  const auto status = at::get_overlap_status(q, k);
  VLFUSE_CHECK_VALUE(status == at::MemOverlapStatus::No, op,
                     "q and k share memory; the in-place rotation needs them to be distinct tensors");
}

std::tuple<Tensor, Tensor> rope_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& positions,
                                    const Tensor& freqs, bool inverse) {
  const char* op = "rope";
  const Tensor q = check_qk(op, q_in, "q", nullptr);
  const Tensor k = check_qk(op, k_in, "k", &q);
  const int64_t S = q.size(0), D = q.size(2);
  Params p;
  init(p, q, S, D, inverse);
  Tensor f = set_angle_source(p, op, positions, freqs, S, D, q, "q");
  Tensor q_out = cpu::empty_output(q.sizes(), q.options());
  Tensor k_out = cpu::empty_output(k.sizes(), k.options());
  set_slot(p, q, q_out, true);
  set_slot(p, k, k_out, true);
  launch(p, q);
  return {q_out, k_out};
}

void rope_inplace(const Tensor& q, const Tensor& k, const Tensor& positions, const Tensor& freqs, bool inverse) {
  const char* op = "rope_";
  check_qk(op, q, "q", nullptr);
  check_qk(op, k, "k", &q);
  VLFUSE_CHECK_VALUE(q.stride(2) == 1 && k.stride(2) == 1, op,
                     "the in-place rotation needs unit stride on head_dim for q and k, got strides ", q.strides(),
                     " and ", k.strides());
  check_no_overlap(op, q, k);
  const int64_t S = q.size(0), D = q.size(2);
  Params p;
  init(p, q, S, D, inverse);
  Tensor f = set_angle_source(p, op, positions, freqs, S, D, q, "q");
  set_slot(p, q, q, true);
  set_slot(p, k, k, true);
  launch(p, q);
}

std::tuple<Tensor, Tensor> rope_cos_sin(const Tensor& q_in, const Tensor& k_in, const Tensor& cos_in,
                                        const Tensor& sin_in, bool inverse) {
  const char* op = "rope_cos_sin";
  const Tensor q = check_qk(op, q_in, "q", nullptr);
  const Tensor k = check_qk(op, k_in, "k", &q);
  const int64_t S = q.size(0), D = q.size(2);
  const auto acc = acc_type(q.scalar_type());
  Tensor tables[2];
  const Tensor* raw[2] = {&cos_in, &sin_in};
  const char* names[2] = {"cos", "sin"};
  for (int i = 0; i < 2; ++i) {
    const Tensor& t = *raw[i];
    check_same_device(t, names[i], q, "q", op);
    check_float_tensor(t, op, names[i]);
    VLFUSE_CHECK_VALUE(t.dim() == 2 && t.size(0) == S && t.size(1) == D, op, names[i],
                       " must be [tokens, head_dim] = [", S, ", ", D, "], got shape ", t.sizes());
    tables[i] = t.scalar_type() == acc && t.stride(1) == 1 ? t : t.to(acc).contiguous();
  }
  Params p;
  init(p, q, S, D, inverse);
  p.source = AngleSource::Table;
  p.cos = tables[0].data_ptr();
  p.sin = tables[1].data_ptr();
  p.cos_stride_s = tables[0].stride(0);
  p.sin_stride_s = tables[1].stride(0);
  Tensor q_out = cpu::empty_output(q.sizes(), q.options());
  Tensor k_out = cpu::empty_output(k.sizes(), k.options());
  set_slot(p, q, q_out, true);
  set_slot(p, k, k_out, true);
  launch(p, q);
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfuse, CPU, m) {
  m.impl("rope_qkv", &rope_qkv);
  m.impl("rope_qkv_backward", &rope_qkv_backward);
  m.impl("rope", &rope_fwd);
  m.impl("rope_", &rope_inplace);
  m.impl("rope_cos_sin", &rope_cos_sin);
}

#ifdef VLFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vlfuse, CUDA, m) {
  m.impl("rope_qkv", &rope_qkv);
  m.impl("rope_qkv_backward", &rope_qkv_backward);
  m.impl("rope", &rope_fwd);
  m.impl("rope_", &rope_inplace);
  m.impl("rope_cos_sin", &rope_cos_sin);
}
#endif

}  // namespace vlfuse::rope
