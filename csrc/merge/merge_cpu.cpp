// CPU norm + m x m merge kernels. Compiled once per ISA (see CMakeLists.txt). Forward: parallel over output
// rows; each of a row's m^2 source tokens is read from memory once (its statistics are two passes over the
// token while it sits in L1: sum, then the sum of squared deviations, which is stable where E[x^2] - E[x]^2 is
// not) and its normalized values are written straight into the merged row. Backward: the same walk, with
// per-chunk weight/bias partial sums reduced in a fixed order at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "cpu_vec.h"
#include "merge/merge.h"

namespace vlfuse::VLFUSE_ISA_NS {

using at::vec::Vectorized;
using merge::Norm;
using merge::Params;

namespace {

template <typename scalar_t>
struct Row {
  using IO = cpu::VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using fVec = typename IO::fVec;
  static constexpr int kParts = IO::kAccPerBlock;
  static constexpr int64_t W = fVec::size();

  // Calls f(i, n, v) for each block of up to kBlock elements of the row, v its values with lanes past n zero.
  template <typename F>
  static inline void for_blocks(const scalar_t* x, int64_t C, F&& f) {
    for (int64_t i = 0; i < C; i += IO::kBlock) {
      const int64_t n = std::min<int64_t>(IO::kBlock, C - i);
      fVec v[kParts];
      IO::load(x + i, n, v);
      f(i, n, v);
    }
  }

  // Independent accumulator sets for the row reductions: one chain of dependent adds would make every pass
  // latency-bound (C / W adds in a row); kChains chains keep the FMA units busy.
  static constexpr int kChains = 4 / kParts;

  // Like for_blocks, but also passes u = the accumulator chain the block belongs to (block index % kChains).
  template <typename F>
  static inline void for_blocks_chained(const scalar_t* x, int64_t C, F&& f) {
    int64_t i = 0;
    for (; i + kChains * IO::kBlock <= C; i += kChains * IO::kBlock) {
      for (int u = 0; u < kChains; ++u) {
        fVec v[kParts];
        IO::load(x + i + u * IO::kBlock, IO::kBlock, v);
        f(u, i + u * IO::kBlock, IO::kBlock, v);
      }
    }
    for (int u = 0; i < C; i += IO::kBlock, ++u) {
      const int64_t n = std::min<int64_t>(IO::kBlock, C - i);
      fVec v[kParts];
      IO::load(x + i, n, v);
      f(u, i, n, v);
    }
  }

  // Zeroes the lanes of part j of a block that lie past its n valid elements.
  static inline fVec mask_tail(const fVec& v, int64_t n, int j) {
    const int64_t valid = n - j * W;
    if (valid >= W) {
      return v;
    }
    return valid <= 0 ? fVec(acc_t(0)) : fVec::set(fVec(acc_t(0)), v, valid);
  }

  // Sum of all lanes of acc[kChains][kParts].
  static inline acc_t reduce(const fVec (&acc)[kChains][kParts]) {
    fVec total = acc[0][0];
    for (int u = 0; u < kChains; ++u) {
      for (int j = u == 0 ? 1 : 0; j < kParts; ++j) {
        total = total + acc[u][j];
      }
    }
    return at::vec::vec_reduce_all<acc_t>([](fVec& a, fVec& b) { return a + b; }, total);
  }

  static inline void zero(fVec (&acc)[kChains][kParts]) {
    for (int u = 0; u < kChains; ++u) {
      std::fill(acc[u], acc[u] + kParts, fVec(acc_t(0)));
    }
  }

  // mean and rstd of one token by the corrected two-pass algorithm (Chan, Golub and LeVeque): the mean, then
  // the sums of d = x - mean and of d^2; the first corrects the rounding of the mean (free: d is computed
  // anyway) and the second is a sum of non-negative terms, stable where E[x^2] - E[x]^2 is not. The token
  // is in L1 after the first pass.
  static inline void stats(const scalar_t* x, int64_t C, Norm norm, double eps, acc_t& mean, acc_t& rstd) {
    fVec sum[kChains][kParts], sum_sq[kChains][kParts];
    zero(sum);
    mean = acc_t(0);
    if (norm == Norm::LayerNorm) {
      for_blocks_chained(x, C, [&](int u, int64_t, int64_t, const fVec* v) {
        for (int j = 0; j < kParts; ++j) {
          sum[u][j] = sum[u][j] + v[j];
        }
      });
      mean = reduce(sum) / static_cast<acc_t>(C);
      zero(sum);
    }
    zero(sum_sq);
    const fVec mv(mean);
    for_blocks_chained(x, C, [&](int u, int64_t, int64_t n, const fVec* v) {
      for (int j = 0; j < kParts; ++j) {
        const fVec d = mask_tail(v[j] - mv, n, j);
        sum[u][j] = sum[u][j] + d;
        sum_sq[u][j] = at::vec::fmadd(d, d, sum_sq[u][j]);
      }
    });
    acc_t var, shift;
    merge::corrected_moments(reduce(sum), reduce(sum_sq), static_cast<acc_t>(C), norm, shift, var);
    mean += shift;
    rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
  }
};

template <typename scalar_t>
void forward_impl(const Params& p) {
  using R = Row<scalar_t>;
  using acc_t = typename R::acc_t;
  using fVec = typename R::fVec;
  constexpr int kParts = R::kParts;
  const int64_t C = p.channels, m = p.merge_size, mm = m * m, rows = p.tokens / mm;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* mean_out = static_cast<acc_t*>(p.mean);
  auto* rstd_out = static_cast<acc_t*>(p.rstd);
  const auto* weight = static_cast<const acc_t*>(p.weight);
  const auto* bias = static_cast<const acc_t*>(p.bias);
  const int64_t grain = std::max<int64_t>(1, 32768 / (mm * C));

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < mm; ++k) {
        const int64_t tok =
            merge::source_token(p.order, r, k, m, p.grid, p.grid_stride0, p.grid_stride1, p.offsets, p.items);
        const scalar_t* xr = x + tok * p.x_stride;
        scalar_t* y = out + (r * mm + k) * C;
        acc_t mean, rstd;
        R::stats(xr, C, p.norm, p.eps, mean, rstd);
        const fVec mv(mean), rv(rstd);
        R::for_blocks(xr, C, [&](int64_t i, int64_t n, const fVec* v) {
          fVec wv[kParts], bv[kParts], yv[kParts];
          cpu::load_acc<acc_t, kParts>(weight + i, n, wv);
          if (bias != nullptr) {
            cpu::load_acc<acc_t, kParts>(bias + i, n, bv);
          } else {
            std::fill(bv, bv + kParts, fVec(acc_t(0)));
          }
          for (int j = 0; j < kParts; ++j) {
            yv[j] = merge::normalize<fVec>(v[j], mv, rv, wv[j], bv[j]);
          }
          R::IO::store(y + i, n, yv);
        });
        if (mean_out != nullptr) {
          mean_out[tok] = mean;
        }
        rstd_out[tok] = rstd;
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Params& p) {
  using R = Row<scalar_t>;
  using acc_t = typename R::acc_t;
  using fVec = typename R::fVec;
  constexpr int kParts = R::kParts;
  const int64_t C = p.channels, m = p.merge_size, mm = m * m, rows = p.tokens / mm;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out);
  auto* grad_x = static_cast<scalar_t*>(p.grad_x);
  const auto* mean_in = static_cast<const acc_t*>(p.mean);
  const auto* rstd_in = static_cast<const acc_t*>(p.rstd);
  const auto* weight = static_cast<const acc_t*>(p.weight);
  const bool want_w = p.grad_weight != nullptr, want_b = p.grad_bias != nullptr;
  // A fixed split into at most 64 chunks (not one per thread), so the partial sums, and hence the weight and
  // bias gradients, do not depend on the thread count.
  const int64_t rows_per_chunk = std::max<int64_t>((rows + 63) / 64, std::max<int64_t>(1, 8192 / (mm * C)));
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<acc_t> partial(want_w || want_b ? chunks * 2 * C : 0, acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* pw = partial.empty() ? nullptr : partial.data() + chunk * 2 * C;
      acc_t* pb = pw == nullptr ? nullptr : pw + C;
      const int64_t r_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t r = chunk * rows_per_chunk; r < r_end; ++r) {
        for (int64_t k = 0; k < mm; ++k) {
          const int64_t tok =
              merge::source_token(p.order, r, k, m, p.grid, p.grid_stride0, p.grid_stride1, p.offsets, p.items);
          const scalar_t* xr = x + tok * p.x_stride;
          const scalar_t* dy = grad_out + r * p.grad_out_stride + k * C;
          const fVec mv(mean_in != nullptr ? mean_in[tok] : acc_t(0));
          const fVec rv(rstd_in[tok]);
          fVec mean_g(acc_t(0)), mean_gx(acc_t(0));
          if (grad_x != nullptr) {
            fVec sg[R::kChains][kParts], sgx[R::kChains][kParts];
            R::zero(sg);
            R::zero(sgx);
            R::for_blocks_chained(xr, C, [&](int u, int64_t i, int64_t n, const fVec* v) {
              fVec dv[kParts], wv[kParts];
              R::IO::load(dy + i, n, dv);
              cpu::load_acc<acc_t, kParts>(weight + i, n, wv);
              for (int j = 0; j < kParts; ++j) {
                // dy and w are zero past n, so g and g * xhat are too.
                const fVec g = dv[j] * wv[j];
                sg[u][j] = sg[u][j] + g;
                sgx[u][j] = at::vec::fmadd(g, (v[j] - mv) * rv, sgx[u][j]);
              }
            });
            const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
            mean_g = fVec(p.norm == Norm::LayerNorm ? R::reduce(sg) * inv_c : acc_t(0));
            mean_gx = fVec(R::reduce(sgx) * inv_c);
          }
          R::for_blocks(xr, C, [&](int64_t i, int64_t n, const fVec* v) {
            fVec dv[kParts], wv[kParts], dx[kParts];
            R::IO::load(dy + i, n, dv);
            cpu::load_acc<acc_t, kParts>(weight + i, n, wv);
            for (int j = 0; j < kParts; ++j) {
              const fVec xhat = (v[j] - mv) * rv;
              dx[j] = merge::norm_grad_input<fVec>(dv[j] * wv[j], xhat, rv, mean_g, mean_gx);
              const int64_t off = i + j * R::W;
              const int64_t valid = std::min<int64_t>(R::W, n - j * R::W);
              if (valid <= 0) {
                continue;
              }
              if (want_w) {
                at::vec::fmadd(dv[j], xhat, fVec::loadu(pw + off, valid)).store(pw + off, valid);
              }
              if (want_b) {
                (fVec::loadu(pb + off, valid) + dv[j]).store(pb + off, valid);
              }
            }
            if (grad_x != nullptr) {
              R::IO::store(grad_x + tok * C + i, n, dx);
            }
          });
        }
      }
    }
  });

  if (partial.empty()) {
    return;
  }
  acc_t* outs[2] = {static_cast<acc_t*>(p.grad_weight), static_cast<acc_t*>(p.grad_bias)};
  for (int which = 0; which < 2; ++which) {
    if (outs[which] == nullptr) {
      continue;
    }
    for (int64_t c = 0; c < C; c += R::W) {
      const int64_t n = std::min<int64_t>(R::W, C - c);
      fVec total(acc_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        total = total + fVec::loadu(partial.data() + (chunk * 2 + which) * C + c, n);
      }
      total.store(outs[which] + c, n);
    }
  }
}

}  // namespace

void merge_forward_cpu_kernel(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.merge2x2", [&] { forward_impl<scalar_t>(p); });
}

void merge_backward_cpu_kernel(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.merge2x2_backward", [&] { backward_impl<scalar_t>(p); });
}

}  // namespace vlfuse::VLFUSE_ISA_NS
