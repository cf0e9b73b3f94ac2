// CPU epilogue of linear_act: one pass over the GEMM's [rows, cols] output, parallel over rows, vectorized along
// each row in the accumulation type. Compiled once per ISA (see CMakeLists.txt).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/cpu_vec.h"
#include "linear_act/linear_act.h"

namespace vlfuse::VLFUSE_ISA_NS {

using at::vec::Vectorized;
using linear_act::Act;
using linear_act::Params;

namespace {

// exp, tanh and erf of a whole vector (at::vec's SLEEF-backed versions where the ISA has them).
struct VecMath {
  template <typename V>
  static V exp(const V& x) {
    return x.exp();
  }
  template <typename V>
  static V tanh(const V& x) {
    return x.tanh();
  }
  template <typename V>
  static V erf(const V& x) {
    return x.erf();
  }
};

// One row of `cols` elements: W = Vectorized<acc_t>::size() at a time, the last n < W through the partial loads.
template <Act A, typename in_t, typename out_t>
struct Epilogue {
  using acc_t = at::opmath_type<out_t>;
  using fVec = Vectorized<acc_t>;
  static constexpr int64_t W = fVec::size();

  static void forward_row(const in_t* in, const acc_t* bias, out_t* preact, out_t* out, int64_t cols) {
    const auto step = [&](int64_t c, auto load, auto store) {
      fVec v = load(in + c);
      if (bias != nullptr) {
        v = v + load_bias(bias + c, cols - c);
      }
      if (preact != nullptr) {
        store(preact + c, v);
      }
      store(out + c, linear_act::act_forward<A, VecMath>(v));
    };
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      step(c, [](const auto* p) { return cpu::load_acc_vec(p); },
           [](auto* p, const fVec& v) { cpu::store_acc_vec(p, v); });
    }
    if (c < cols) {
      const int64_t n = cols - c;
      step(c, [n](const auto* p) { return cpu::load_acc_vec(p, n); },
           [n](auto* p, const fVec& v) { cpu::store_acc_vec(p, v, n); });
    }
  }

  static void backward_row(const out_t* preact, const out_t* grad, out_t* out, int64_t cols) {
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      const fVec d = linear_act::act_derivative<A, VecMath>(cpu::load_acc_vec(preact + c));
      cpu::store_acc_vec(out + c, cpu::load_acc_vec(grad + c) * d);
    }
    if (c < cols) {
      const int64_t n = cols - c;
      const fVec d = linear_act::act_derivative<A, VecMath>(cpu::load_acc_vec(preact + c, n));
      cpu::store_acc_vec(out + c, cpu::load_acc_vec(grad + c, n) * d, n);
    }
  }

  static fVec load_bias(const acc_t* p, int64_t left) {
    return left >= W ? fVec::loadu(p) : fVec::loadu(p, left);
  }

  static void run(const Params& p) {
    const auto* in = static_cast<const in_t*>(p.in);
    const auto* bias = static_cast<const acc_t*>(p.bias);
    auto* preact = static_cast<out_t*>(p.preact);
    auto* out = static_cast<out_t*>(p.out);
    const auto* grad = static_cast<const out_t*>(p.grad);
    const int64_t cols = p.cols;
    // Rows per task: enough elements that a task's start-up is small against its work.
    const int64_t grain = std::max<int64_t>(1, 16384 / cols);
    at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * cols;
        if (p.backward) {
          backward_row(reinterpret_cast<const out_t*>(in) + off, grad + off, out + off, cols);
        } else {
          forward_row(in + off, bias, preact != nullptr ? preact + off : nullptr, out + off, cols);
        }
      }
    });
  }
};

template <typename in_t, typename out_t>
void run_act(const Params& p) {
  switch (p.act) {
    case Act::QuickGelu:
      return Epilogue<Act::QuickGelu, in_t, out_t>::run(p);
    case Act::Gelu:
      return Epilogue<Act::Gelu, in_t, out_t>::run(p);
    case Act::GeluTanh:
      return Epilogue<Act::GeluTanh, in_t, out_t>::run(p);
    case Act::Silu:
      return Epilogue<Act::Silu, in_t, out_t>::run(p);
    case Act::None:
      return Epilogue<Act::None, in_t, out_t>::run(p);
  }
}

}  // namespace

void linear_act_cpu_kernel(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.out_dtype),
                                  "vlfuse.linear_act", [&] {
    // The GEMM's output is the op's dtype, or float32 where a reduced type took the float32 GEMM route.
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      if (p.in_dtype != p.out_dtype) {
        return run_act<float, scalar_t>(p);
      }
    }
    run_act<scalar_t, scalar_t>(p);
  });
}

}  // namespace vlfuse::VLFUSE_ISA_NS
