// Attention within packed segments: argument checks (the only ones; the Python wrapper adds none besides the
// device, see python/vlfuse/ops/attention.py), output allocation, and the hand-off of an attention::Params block
// to the CPU kernel. float64 runs ATen's flash attention run by run (it is there for gradcheck). The backward is
// ATen's CPU flash-attention backward, run by run, from the forward's output and log-sum-exp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "attention/attention.h"
#include "common/dispatch.h"

VLFUSE_DECLARE_CPU_KERNEL(segment_attention_cpu_kernel, const ::vlfuse::attention::Params&)

namespace vlfuse::attention {

namespace {

using at::Tensor;

constexpr const char* kOp = "segment_attention";

struct Run {
  int64_t start, count, length;
};

// Checks groups (flattened (first token, segment count, segment length) triples) against the token count.
std::vector<Run> parse_groups(at::IntArrayRef groups, int64_t tokens) {
  VLFUSE_CHECK_VALUE(groups.size() % 3 == 0, kOp,
                     "groups must be (first token, segment count, segment length) triples, got ", groups.size(),
                     " values");
  std::vector<Run> runs;
  int64_t next = 0;
  for (size_t i = 0; i < groups.size(); i += 3) {
    const Run run{groups[i], groups[i + 1], groups[i + 2]};
    VLFUSE_CHECK_VALUE(run.start == next && run.count >= 0 && run.length >= 1, kOp, "groups[", i / 3, "] = (",
                       run.start, ", ", run.count, ", ", run.length,
                       ") must start where the previous run ends (token ", next,
                       ") with count >= 0 and length >= 1");
    next += run.count * run.length;
    runs.push_back(run);
  }
  VLFUSE_CHECK_VALUE(next == tokens, kOp, "groups cover ", next, " tokens but q has ", tokens);
  return runs;
}

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_float_tensor(q, kOp, "q");
  check_dim(q, 3, kOp, "q", "[heads, tokens, head_dim]");
  VLFUSE_CHECK_VALUE(q.size(0) > 0 && q.size(2) > 0, kOp, "q must have at least one head and one channel, got ",
                     q.sizes());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    check_same_device(t, name, q, "q", kOp);
    VLFUSE_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, name, " has dtype ", t.scalar_type(),
                      " but q has ", q.scalar_type());
    VLFUSE_CHECK_VALUE(t.sizes() == q.sizes(), kOp, name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  }
  VLFUSE_CHECK_VALUE(q.is_cpu(), kOp, "q is on ", q.device(),
                     ": this op runs on CPU (on CUDA, torch.nn.functional.scaled_dot_product_attention is flash "
                     "attention)");
}

// [H, S, D] -> run r's segments as [count, H, length, D] (a view).
Tensor run_view(const Tensor& t, const Run& r) {
  const int64_t H = t.size(0), D = t.size(2);
  return t.narrow(1, r.start, r.count * r.length).view({H, r.count, r.length, D}).transpose(0, 1);
}
// [S, H * D] -> [count, H, length, D]
Tensor run_view_rows(const Tensor& t, const Run& r, int64_t H) {
  return t.narrow(0, r.start, r.count * r.length).view({r.count, r.length, H, -1}).transpose(1, 2);
}
// [H, S] -> [count, H, length]
Tensor run_view_lse(const Tensor& t, const Run& r) {
  return t.narrow(1, r.start, r.count * r.length).view({t.size(0), r.count, r.length}).transpose(0, 1);
}

std::tuple<Tensor, Tensor> segment_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                             at::IntArrayRef groups, double scale) {
  check_qkv(q_in, k_in, v_in);
  VLFUSE_CHECK_VALUE(std::isfinite(scale), kOp, "scale must be finite, got ", scale);
  const int64_t H = q_in.size(0), S = q_in.size(1), D = q_in.size(2);
  const auto runs = parse_groups(groups, S);
  const auto unit_stride = [](const Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); };
  const Tensor q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in);
  Tensor out = at::empty({S, H * D}, q.options());
  // float32 log-sum-exp (float64 for float64 inputs, as ATen saves it)
  Tensor lse = at::empty({H, S}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (q.scalar_type() == at::kDouble) {
    for (const Run& r : runs) {
      if (r.count == 0) {
        continue;
      }
      auto [o, l] = at::_scaled_dot_product_flash_attention_for_cpu(run_view(q, r), run_view(k, r), run_view(v, r),
                                                                      0.0, false, std::nullopt, scale);
      run_view_rows(out, r, H).copy_(o);
      run_view_lse(lse, r).copy_(l);
    }
    return {out, lse};
  }
  Params p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride_h = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.k_stride_h = k.stride(0);
  p.k_stride_s = k.stride(1);
  p.v_stride_h = v.stride(0);
  p.v_stride_s = v.stride(1);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.groups = groups.data();
  p.num_groups = static_cast<int64_t>(groups.size() / 3);
  p.heads = H;
  p.tokens = S;
  p.head_dim = D;
  p.scale = static_cast<float>(scale);
  p.dtype = static_cast<int8_t>(q.scalar_type());
  run_kernel(kOp, q, VLFUSE_CPU_KERNEL(segment_attention_cpu_kernel), nullptr, p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> segment_attention_backward(const Tensor& grad_out, const Tensor& q,
                                                              const Tensor& k, const Tensor& v, const Tensor& out,
                                                              const Tensor& lse, at::IntArrayRef groups,
                                                              double scale) {
  check_qkv(q, k, v);
  const int64_t H = q.size(0), S = q.size(1), D = q.size(2);
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    check_same_device(t, name, q, "q", kOp);
    VLFUSE_CHECK_VALUE(t.dim() == 2 && t.size(0) == S && t.size(1) == H * D, kOp, name, " must be [tokens, heads * head_dim] = [", S,
                       ", ", H * D, "], got ", t.sizes());
  }
  VLFUSE_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == H && lse.size(1) == S && lse.scalar_type() == at::kFloat ||
                         (q.scalar_type() == at::kDouble && lse.scalar_type() == at::kDouble),
                     kOp, "logsumexp must be float32 [heads, tokens] = [", H, ", ", S, "], got ", lse.sizes(), " ",
                     lse.scalar_type());
  const auto runs = parse_groups(groups, S);
  Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const Tensor g = grad_out.to(q.scalar_type());
  for (const Run& r : runs) {
    if (r.count == 0) {
      continue;
    }
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        run_view_rows(g, r, H), run_view(q, r), run_view(k, r), run_view(v, r), run_view_rows(out, r, H),
        run_view_lse(lse, r), 0.0, false, std::nullopt, scale);
    run_view(dq, r).copy_(gq);
    run_view(dk, r).copy_(gk);
    run_view(dv, r).copy_(gv);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfuse, CPU, m) {
  m.impl("segment_attention", &segment_attention);
  m.impl("segment_attention_backward", &segment_attention_backward);
}

}  // namespace vlfuse::attention
