// CPU norm + m x m merge kernels. Compiled once per ISA (see CMakeLists.txt). Forward: parallel over output
// rows; each of a row's m^2 source tokens is read from memory once, in one statistics pass (shifted sums, see
// Row::stats), and its normalized values are written straight into the merged row by a second pass over the
// token while it sits in L1. Backward: the same walk, a first pass per token for the two row sums of the input
// gradient, then one pass over a group of tokens (kGradGroup) that writes their gradients and adds to per-chunk
// weight/bias partial sums, reduced in a fixed order at the end. Both prefetch the tokens read next during the
// last pass over the current ones, so a first pass does not wait on memory, and write with streaming stores
// when the call's data outgrows the caches it can count on (cpu::prefer_streaming_stores).
//
// The row passes keep their accumulators in registers: every loop below is over whole blocks with a
// compile-time width (Full) and compile-time accumulator indices, and only the last, shorter block of a row
// takes the partial load/store path. Whole blocks go through cpu::BlockIO, whose lane order may be permuted
// (bfloat16 on AVX2): the [C] weight and bias are laid out in that order once per call, and the weight/bias
// gradients put back in natural order at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_vec.h"
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
  static constexpr int64_t kBlock = IO::kBlock;
  static constexpr int64_t W = fVec::size();
  // Independent accumulator vectors per reduction: one chain of dependent adds would make every pass
  // latency-bound (C / W adds in a row); four keep the adders busy. kUnroll blocks make up one step.
  static constexpr int kAcc = 4;
  static constexpr int kUnroll = kAcc / kParts;
  using Full = std::integral_constant<int64_t, kBlock>;
  template <int U>
  using Slot = std::integral_constant<int, U>;

  // Calls f(i, n, slot) for each block [i, i + n) of a row of C elements: n is Full{} (so the loads and stores
  // in f compile to their full-width form) for all but a shorter last block, and slot (a compile-time
  // integral_constant in [0, kUnroll)) names the accumulator set the block adds into.
  template <typename F>
  static inline void for_blocks(int64_t C, F&& f) {
    int64_t i = 0;
    for (; i + kUnroll * kBlock <= C; i += kUnroll * kBlock) {
      [&]<int... U>(std::integer_sequence<int, U...>) {
        (f(i + U * kBlock, Full{}, Slot<U>{}), ...);
      }(std::make_integer_sequence<int, kUnroll>{});
    }
    for (; i + kBlock <= C; i += kBlock) {
      f(i, Full{}, Slot<0>{});
    }
    if (i < C) {
      f(i, C - i, Slot<0>{});
    }
  }

  // Loads n elements of a token (lanes past n zero); whole blocks in BlockIO's lane order.
  template <typename N>
  static inline void load(const scalar_t* p, N n, fVec* v) {
    if constexpr (std::is_same_v<N, Full>) {
      cpu::BlockIO<scalar_t>::load(p, v);
    } else {
      IO::load(p, n, v);
    }
  }

  template <typename N>
  static inline void store(scalar_t* p, N n, const fVec* v, bool stream) {
    if constexpr (std::is_same_v<N, Full>) {
      cpu::BlockIO<scalar_t>::store(p, v, stream);
    } else {
      IO::store(p, n, v);
    }
  }

  // Loads n elements of a [C] acc_t table laid out by block_order (lanes past n zero).
  template <typename N>
  static inline void load_table(const acc_t* p, N n, fVec* v) {
    if constexpr (std::is_same_v<N, Full>) {
      for (int j = 0; j < kParts; ++j) {
        v[j] = fVec::loadu(p + j * W);
      }
    } else {
      cpu::load_acc<acc_t, kParts>(p, n, v);
    }
  }

  // A [C] table in BlockIO's lane order: the table itself where that is the natural order, else a copy kept in
  // `storage`. Null stays null.
  static const acc_t* block_order(const acc_t* table, int64_t C, std::vector<acc_t>& storage) {
    if (!cpu::BlockIO<scalar_t>::kPermuted || table == nullptr) {
      return table;
    }
    storage.resize(C);
    cpu::reorder_blocks<scalar_t>(table, C, storage.data(), /*to_block=*/true);
    return storage.data();
  }

  // Zeroes the lanes of part j of a block that lie past its n valid elements (a no-op for full blocks).
  template <typename N>
  static inline fVec mask_tail(const fVec& v, N n, int j) {
    if constexpr (std::is_same_v<N, Full>) {
      return v;
    } else {
      const int64_t valid = n - j * W;
      if (valid >= W) {
        return v;
      }
      return valid <= 0 ? fVec(acc_t(0)) : fVec::set(fVec(acc_t(0)), v, valid);
    }
  }

  static inline void zero(fVec (&acc)[kAcc]) {
    for (int a = 0; a < kAcc; ++a) {
      acc[a] = fVec(acc_t(0));
    }
  }

  static inline acc_t reduce(const fVec (&acc)[kAcc]) {
    const fVec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    return at::vec::vec_reduce_all<acc_t>([](fVec& a, fVec& b) { return a + b; }, total);
  }

  // Sum of the first n elements of a token.
  static inline acc_t sum(const scalar_t* x, int64_t n) {
    fVec acc[kAcc];
    zero(acc);
    for_blocks(n, [&](int64_t i, auto len, auto slot) {
      fVec v[kParts];
      load(x + i, len, v);
      for (int j = 0; j < kParts; ++j) {
        acc[slot * kParts + j] += v[j];
      }
    });
    return reduce(acc);
  }

  // Sums of d = x - K and of d^2 over a token.
  static inline void shifted_sums(const scalar_t* x, int64_t C, acc_t K, acc_t& sum_d, acc_t& sum_d2) {
    fVec s[kAcc], q[kAcc];
    zero(s);
    zero(q);
    const fVec kv(K);
    for_blocks(C, [&](int64_t i, auto n, auto slot) {
      fVec v[kParts];
      load(x + i, n, v);
      for (int j = 0; j < kParts; ++j) {
        const fVec d = mask_tail(v[j] - kv, n, j);
        s[slot * kParts + j] += d;
        q[slot * kParts + j] = at::vec::fmadd(d, d, q[slot * kParts + j]);
      }
    });
    sum_d = reduce(s);
    sum_d2 = reduce(q);
  }

  // mean and rstd of one token by shifted sums: with K an estimate of the mean, the sums of d = x - K and of
  // d^2 give mean = K + sum_d / C and var = sum_d2 / C - (sum_d / C)^2, whose rounding error is that of a sum
  // of squares of size C * (var + (mean - K)^2): a few roundings of var when (mean - K)^2 <= 8 var, where
  // E[x^2] - E[x]^2 (K = 0) would lose every digit for a token with a large common offset. K is the mean of the
  // token's first n0 >= C / 8 elements (all of them for C <= 64), which by Cauchy-Schwarz gives
  // (mean - K)^2 <= (C / n0) var <= 8 var, at the cost of re-reading C / 8 elements that are in L1.
  // bfloat16 in the AVX512_BF16 build first takes the plain sums (K = 0), one vdpbf16ps per 32 values and sum
  // (cpu::bf16_sums), and keeps them when they say mean^2 <= 8 var (their error cannot move that test by more
  // than ~1e-4 of var); a token that fails it, or has a NaN, is summed again with K = that mean. Other types
  // keep the K estimate: plain float sums are not faster enough to be worth results that differ in the last
  // bits from before (a training run's trajectory follows them). RMSNorm's "variance" is mean(x^2) itself.
  static inline void stats(const scalar_t* x, int64_t C, Norm norm, double eps, acc_t& mean, acc_t& rstd) {
    const acc_t count = static_cast<acc_t>(C);
    const auto rstd_of = [eps](acc_t var) { return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps)); };
    acc_t K = acc_t(0), sum_d, sum_d2, var;
#if defined(VLFUSE_ISA_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      cpu::bf16_sums(x, C, sum_d, sum_d2);
      merge::corrected_moments(sum_d, sum_d2, count, norm, mean, var);
      if (norm == Norm::RMSNorm || mean * mean <= acc_t(8) * var) {
        rstd = rstd_of(var);
        return;
      }
      K = mean;
    } else  // the estimate below is for the other types
#endif
    if (norm == Norm::LayerNorm) {
      const int64_t n0 = std::min<int64_t>(C, std::max<int64_t>(64, C / 8));
      K = sum(x, n0) / static_cast<acc_t>(n0);
    }
    shifted_sums(x, C, K, sum_d, sum_d2);
    merge::corrected_moments(sum_d, sum_d2, count, norm, mean, var);
    mean += K;
    rstd = rstd_of(var);
  }

  // The per-token work takes everything by value: the kernels' vector stores may alias any memory, so values
  // read through the parallel lambda's captures would be reloaded after every store of the inner loops.

  // Normalizes token x [C] into y [C] (weight and bias in block order, bias may be null) and returns its
  // statistics; prefetches the token read next, next_x.
  static inline void forward_token(const scalar_t* x, scalar_t* y, const acc_t* weight, const acc_t* bias,
                                   int64_t C, Norm norm, double eps, const scalar_t* next_x, bool stream,
                                   acc_t& mean, acc_t& rstd) {
    stats(x, C, norm, eps, mean, rstd);
    const fVec mv(mean), rv(rstd);
    for_blocks(C, [&](int64_t i, auto n, auto) {
      cpu::prefetch(next_x + i);
      fVec v[kParts], wv[kParts], bv[kParts], yv[kParts];
      load(x + i, n, v);
      load_table(weight + i, n, wv);
      if (bias != nullptr) {
        load_table(bias + i, n, bv);
      } else {
        std::fill(bv, bv + kParts, fVec(acc_t(0)));
      }
      for (int j = 0; j < kParts; ++j) {
        yv[j] = merge::normalize<fVec>(v[j], mv, rv, wv[j], bv[j]);
      }
      store(y + i, n, yv, stream);
    });
  }

  // One token of a backward walk: its input, output gradient and input gradient (null when not wanted), its
  // forward statistics (mean 0 for RMSNorm), and the row means of the input gradient's two sums, set by
  // grad_sums.
  struct GradToken {
    const scalar_t* x;
    const scalar_t* dy;
    scalar_t* dx;
    acc_t mean, rstd;
    acc_t mean_g = 0, mean_gx = 0;
  };

  // First backward pass over a token, from memory: mean_g = sum(g) / C and mean_gx = sum(g * xhat) / C with
  // g = dy * w (rstd is factored out of the second sum).
  static inline void grad_sums(GradToken& t, const acc_t* weight, int64_t C, Norm norm) {
    const fVec mv(t.mean);
    fVec sg[kAcc], sgx[kAcc];
    zero(sg);
    zero(sgx);
    for_blocks(C, [&](int64_t i, auto n, auto slot) {
      fVec v[kParts], dv[kParts], wv[kParts];
      load(t.x + i, n, v);
      load(t.dy + i, n, dv);
      load_table(weight + i, n, wv);
      for (int j = 0; j < kParts; ++j) {
        // dy and w are zero past n, so g and g * (x - mean) are too.
        const fVec g = dv[j] * wv[j];
        sg[slot * kParts + j] += g;
        sgx[slot * kParts + j] = at::vec::fmadd(g, v[j] - mv, sgx[slot * kParts + j]);
      }
    });
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
    t.mean_g = norm == Norm::LayerNorm ? reduce(sg) * inv_c : acc_t(0);
    t.mean_gx = reduce(sgx) * t.rstd * inv_c;
  }

  // Second backward pass over G tokens together, from cache (grad_sums has just read them): writes each dx and
  // adds dy * xhat and dy to the partial sums pw and pb [C] (when not null; all in block order). Going over G
  // tokens per block loads the weight and loads and stores the partial sums once per G tokens: once per token,
  // they were over a third of this pass's instructions. Prefetches the G tokens read next (next), so that their
  // grad_sums do not wait on memory and memory is kept busy while this pass runs from cache.
  template <int G>
  static inline void grad_pass(const GradToken* tokens, const GradToken* next, const acc_t* weight, int64_t C,
                               acc_t* pw, acc_t* pb, bool stream) {
    // By value: the stores below may alias any memory, so fields read through `tokens` would be reloaded.
    const scalar_t* xs[G];
    const scalar_t* dys[G];
    scalar_t* dxs[G];
    const scalar_t* next_xs[G];
    const scalar_t* next_dys[G];
    fVec mv[G], rv[G], mg[G], mgx[G];
    for (int k = 0; k < G; ++k) {
      next_xs[k] = next[k].x;
      next_dys[k] = next[k].dy;
      xs[k] = tokens[k].x;
      dys[k] = tokens[k].dy;
      dxs[k] = tokens[k].dx;
      mv[k] = fVec(tokens[k].mean);
      rv[k] = fVec(tokens[k].rstd);
      mg[k] = fVec(tokens[k].mean_g);
      mgx[k] = fVec(tokens[k].mean_gx);
    }
    const bool want_dx = dxs[0] != nullptr;
    for_blocks(C, [&](int64_t i, auto n, auto) {
      fVec wv[kParts], sw[kParts], sb[kParts];
      load_table(weight + i, n, wv);
      for (int j = 0; j < kParts; ++j) {
        sw[j] = fVec(acc_t(0));
        sb[j] = fVec(acc_t(0));
      }
      for (int k = 0; k < G; ++k) {
        cpu::prefetch(next_xs[k] + i);
        cpu::prefetch(next_dys[k] + i);
        fVec v[kParts], dv[kParts], dxv[kParts];
        load(xs[k] + i, n, v);
        load(dys[k] + i, n, dv);
        for (int j = 0; j < kParts; ++j) {
          const fVec xhat = (v[j] - mv[k]) * rv[k];
          dxv[j] = merge::norm_grad_input<fVec>(dv[j] * wv[j], xhat, rv[k], mg[k], mgx[k]);
          sw[j] = at::vec::fmadd(dv[j], xhat, sw[j]);
          sb[j] += dv[j];
        }
        if (want_dx) {
          store(dxs[k] + i, n, dxv, stream);
        }
      }
      for (int j = 0; j < kParts; ++j) {
        const int64_t off = i + j * W;
        if constexpr (std::is_same_v<decltype(n), Full>) {
          if (pw != nullptr) {
            (fVec::loadu(pw + off) + sw[j]).store(pw + off);
          }
          if (pb != nullptr) {
            (fVec::loadu(pb + off) + sb[j]).store(pb + off);
          }
        } else {
          // The last, shorter block: only its valid lanes of the partial sums exist (dy is zero past them).
          const int64_t valid = std::min<int64_t>(W, n - j * W);
          if (valid > 0 && pw != nullptr) {
            (fVec::loadu(pw + off, valid) + sw[j]).store(pw + off, valid);
          }
          if (valid > 0 && pb != nullptr) {
            (fVec::loadu(pb + off, valid) + sb[j]).store(pb + off, valid);
          }
        }
      }
    });
  }
};

// Walk position (row, slot) of the token read after slot k of row r (the same for the last one): the token
// whose first pass the current one's last pass prefetches for.
inline std::pair<int64_t, int64_t> next_slot(const Params& p, int64_t r, int64_t k) {
  const int64_t mm = p.merge_size * p.merge_size;
  const int64_t next = std::min(r * mm + k + 1, p.tokens - 1);
  return {next / mm, next % mm};
}

inline int64_t token_at(const Params& p, int64_t r, int64_t k) {
  return merge::source_token(p.order, r, k, p.merge_size, p.grid, p.grid_stride0, p.grid_stride1, p.offsets,
                             p.items);
}

template <typename scalar_t>
void forward_impl(const Params& p) {
  using R = Row<scalar_t>;
  using acc_t = typename R::acc_t;
  const int64_t C = p.channels, mm = p.merge_size * p.merge_size, rows = p.tokens / mm;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* mean_out = static_cast<acc_t*>(p.mean);
  auto* rstd_out = static_cast<acc_t*>(p.rstd);
  std::vector<acc_t> weight_storage, bias_storage;
  const acc_t* weight = R::block_order(static_cast<const acc_t*>(p.weight), C, weight_storage);
  const acc_t* bias = R::block_order(static_cast<const acc_t*>(p.bias), C, bias_storage);
  const int64_t grain = std::max<int64_t>(1, 32768 / (mm * C));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain);
  const bool stream =
      cpu::prefer_streaming_stores(2 * p.tokens * C * static_cast<int64_t>(sizeof(scalar_t)), threads);

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < mm; ++k) {
        const int64_t tok = token_at(p, r, k);
        const scalar_t* xr = x + tok * p.x_stride;
        scalar_t* y = out + (r * mm + k) * C;
        const auto [next_r, next_k] = next_slot(p, r, k);
        acc_t mean, rstd;
        R::forward_token(xr, y, weight, bias, C, p.norm, p.eps, x + token_at(p, next_r, next_k) * p.x_stride,
                         stream, mean, rstd);
        if (mean_out != nullptr) {
          mean_out[tok] = mean;
        }
        rstd_out[tok] = rstd;
      }
    }
    if (stream) {
      cpu::stream_fence();
    }
  });
}

// Tokens per second backward pass (Row::grad_pass): 4 tokens' x and dy (20 KB in bf16, 40 KB in fp32 at
// C = 1280) are still in L1/L2 when it rereads them.
constexpr int kGradGroup = 4;

template <typename scalar_t>
void backward_impl(const Params& p) {
  using R = Row<scalar_t>;
  using acc_t = typename R::acc_t;
  using fVec = typename R::fVec;
  constexpr int64_t W = R::W;
  const int64_t C = p.channels, mm = p.merge_size * p.merge_size, rows = p.tokens / mm;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out);
  auto* grad_x = static_cast<scalar_t*>(p.grad_x);
  const auto* mean_in = static_cast<const acc_t*>(p.mean);
  const auto* rstd_in = static_cast<const acc_t*>(p.rstd);
  std::vector<acc_t> weight_storage;
  const acc_t* weight = R::block_order(static_cast<const acc_t*>(p.weight), C, weight_storage);
  const bool want_w = p.grad_weight != nullptr, want_b = p.grad_bias != nullptr;
  // A fixed split into at most 32 chunks (not one per thread), so the partial sums, and hence the weight and
  // bias gradients, do not depend on the thread count.
  const int64_t rows_per_chunk = std::max<int64_t>((rows + 31) / 32, std::max<int64_t>(1, 16384 / (mm * C)));
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  // Each chunk's [2, C] partial sums (weight, bias; in block order) are zeroed by the thread that fills them.
  std::unique_ptr<acc_t[]> partial(want_w || want_b ? new acc_t[chunks * 2 * C] : nullptr);
  // x and grad_out read, grad_x written.
  const bool stream = grad_x != nullptr &&
                      cpu::prefer_streaming_stores(3 * p.tokens * C * static_cast<int64_t>(sizeof(scalar_t)),
                                                   std::min<int64_t>(at::get_num_threads(), chunks));

  using GradToken = typename R::GradToken;
  const auto grad_token = [&](int64_t q) {
    const int64_t r = q / mm, k = q % mm, tok = token_at(p, r, k);
    return GradToken{x + tok * p.x_stride, grad_out + r * p.grad_out_stride + k * C,
                     grad_x != nullptr ? grad_x + tok * C : nullptr, mean_in != nullptr ? mean_in[tok] : acc_t(0),
                     rstd_in[tok]};
  };

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* pw = partial ? partial.get() + chunk * 2 * C : nullptr;
      acc_t* pb = pw == nullptr ? nullptr : pw + C;
      if (pw != nullptr) {
        std::fill(pw, pw + 2 * C, acc_t(0));
      }
      // The chunk's walk positions q = r * m^2 + k, in groups of kGradGroup (then single tokens) per second pass.
      const int64_t q_end = std::min(rows, (chunk + 1) * rows_per_chunk) * mm;
      int64_t q = chunk * rows_per_chunk * mm;
      const auto run_group = [&](auto group_size) {
        constexpr int G = decltype(group_size)::value;
        GradToken group[G], next[G];
        for (int g = 0; g < G; ++g) {
          group[g] = grad_token(q + g);
          next[g] = grad_token(std::min(q + G + g, p.tokens - 1));
          if (grad_x != nullptr) {
            R::grad_sums(group[g], weight, C, p.norm);
          }
        }
        R::template grad_pass<G>(group, next, weight, C, want_w ? pw : nullptr, want_b ? pb : nullptr, stream);
        q += G;
      };
      while (q + kGradGroup <= q_end) {
        run_group(std::integral_constant<int, kGradGroup>{});
      }
      while (q < q_end) {
        run_group(std::integral_constant<int, 1>{});
      }
    }
    if (stream) {
      cpu::stream_fence();
    }
  });

  if (!partial) {
    return;
  }
  acc_t* outs[2] = {static_cast<acc_t*>(p.grad_weight), static_cast<acc_t*>(p.grad_bias)};
  std::vector<acc_t> total(C);
  for (int which = 0; which < 2; ++which) {
    if (outs[which] == nullptr) {
      continue;
    }
    acc_t* sum = cpu::BlockIO<scalar_t>::kPermuted ? total.data() : outs[which];
    for (int64_t c = 0; c < C; c += W) {
      const int64_t n = std::min<int64_t>(W, C - c);
      fVec acc(acc_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        acc = acc + fVec::loadu(partial.get() + (chunk * 2 + which) * C + c, n);
      }
      acc.store(sum + c, n);
    }
    if (cpu::BlockIO<scalar_t>::kPermuted) {
      cpu::reorder_blocks<scalar_t>(total.data(), C, outs[which], /*to_block=*/false);
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
