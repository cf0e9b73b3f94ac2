// CPU norm + m x m merge kernels. Compiled once per ISA (see CMakeLists.txt). Forward: parallel over output
// rows; each of a row's m^2 source tokens is read from memory once, in one statistics pass (shifted sums, see
// Row::stats), and its normalized values are written straight into the merged row by a second pass over the
// token while it sits in L1. Backward: the same walk, a first pass per token for the two row sums of the input
// gradient, then one pass over a group of tokens (kGradGroup) that writes their gradients and adds to per-chunk
// weight/bias partial sums, reduced in a fixed order at the end. The post-shuffle norm (Params::postshuffle)
// walks the same way with a merged row's m^2 tokens as the unit: one statistics pass over all of them (still
// one read of each from memory: a window is a few KB), then the per-token normalizing pass with the row's
// statistics and the window slot's part of the [m^2 * C] weight and bias; its backward takes kGradGroup rows'
// sums, then one pass per window slot over those rows' tokens of that slot. Both prefetch the tokens read next
// during the last pass over the current ones, so a first pass does not wait on memory, and write with
// streaming stores when the call's data outgrows the caches it can count on (cpu::prefer_streaming_stores).
//
// The row passes keep their accumulators in registers: every loop below is over whole blocks with a
// compile-time width (Full) and compile-time accumulator indices, and only the last, shorter block of a row
// takes the partial load/store path. The passes, for_blocks and the block bodies of the normalizing and
// gradient passes are forced inline (VLFUSE_ROW_INLINE*): called from both walks, per token and post-shuffle,
// they were no longer inlined as functions called once, and went out of line with the accumulators in memory.
// Whole blocks go through cpu::BlockIO, whose lane order may be permuted (bfloat16 on AVX2): the [C] weight and
// bias are laid out in that order once per call, and the weight/bias gradients put back in natural order at the
// end.
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

#define VLFUSE_ROW_INLINE inline __attribute__((always_inline))
#define VLFUSE_ROW_INLINE_LAMBDA __attribute__((always_inline))

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
  static VLFUSE_ROW_INLINE void for_blocks(int64_t C, F&& f) {
    int64_t i = 0;
    for (; i + kUnroll * kBlock <= C; i += kUnroll * kBlock) {
      [&]<int... U>(std::integer_sequence<int, U...>) VLFUSE_ROW_INLINE_LAMBDA {
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

  // Loads n elements of a table kept in the tokens' own reduced type: the lane order a token's load gives.
  template <typename N>
    requires IO::kReduced
  static inline void load_table(const scalar_t* p, N n, fVec* v) {
    load(p, n, v);
  }

  // A [segments * C] table in BlockIO's lane order, each [C] segment on its own (a token's blocks start at its
  // first channel): the table itself where that is the natural order, else a copy kept in `storage`. Null
  // stays null.
  static const acc_t* block_order(const acc_t* table, int64_t C, int64_t segments, std::vector<acc_t>& storage) {
    if (!cpu::BlockIO<scalar_t>::kPermuted || table == nullptr) {
      return table;
    }
    storage.resize(segments * C);
    for (int64_t s = 0; s < segments; ++s) {
      cpu::reorder_blocks<scalar_t>(table + s * C, C, storage.data() + s * C, /*to_block=*/true);
    }
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
  static VLFUSE_ROW_INLINE acc_t sum(const scalar_t* x, int64_t n) {
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
  static VLFUSE_ROW_INLINE void shifted_sums(const scalar_t* x, int64_t C, acc_t K, acc_t& sum_d, acc_t& sum_d2) {
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

  // mean and rstd of the N = segments * C values of `segments` [C] rows taken together (one token, or the
  // m^2 tokens of a merged row) by shifted sums: with K an estimate of the mean, the sums of d = x - K and of
  // d^2 give mean = K + sum_d / N and var = sum_d2 / N - (sum_d / N)^2, whose rounding error is that of a sum
  // of squares of size N * (var + (mean - K)^2): a few roundings of var when (mean - K)^2 <= 8 var, where
  // E[x^2] - E[x]^2 (K = 0) would lose every digit for a token with a large common offset. K is the mean of the
  // first n0 = min(C, max(64, N / 8)) elements, which by Cauchy-Schwarz gives (mean - K)^2 <= (N / n0) var:
  // at most 8 var for one token or a 2 x 2 window with C >= 64 (m^2 var for wider windows, still a few
  // roundings), at the cost of re-reading n0 elements that are in L1.
  // bfloat16 in the AVX512_BF16 build first takes the plain sums (K = 0), one vdpbf16ps per 32 values and sum
  // (cpu::bf16_sums), and keeps them when they say mean^2 <= 8 var (their error cannot move that test by more
  // than ~1e-4 of var); a token that fails it, or has a NaN, is summed again with K = that mean. Other types
  // keep the K estimate: plain float sums are not faster enough to be worth results that differ in the last
  // bits from before (a training run's trajectory follows them). RMSNorm's "variance" is mean(x^2) itself.
  static inline void stats(const scalar_t* const* segs, int64_t segments, int64_t C, Norm norm, double eps,
                           acc_t& mean, acc_t& rstd) {
    const int64_t N = segments * C;
    const acc_t count = static_cast<acc_t>(N);
    const auto rstd_of = [eps](acc_t var) { return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps)); };
    acc_t K = acc_t(0), sum_d = acc_t(0), sum_d2 = acc_t(0), var;
#if defined(VLFUSE_ISA_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      for (int64_t s = 0; s < segments; ++s) {
        acc_t seg_sum, seg_sq;
        cpu::bf16_sums(segs[s], C, seg_sum, seg_sq);
        sum_d += seg_sum;
        sum_d2 += seg_sq;
      }
      merge::corrected_moments(sum_d, sum_d2, count, norm, mean, var);
      if (norm == Norm::RMSNorm || mean * mean <= acc_t(8) * var) {
        rstd = rstd_of(var);
        return;
      }
      K = mean;
      sum_d = sum_d2 = acc_t(0);
    } else  // the estimate below is for the other types
#endif
    if (norm == Norm::LayerNorm) {
      const int64_t n0 = std::min<int64_t>(C, std::max<int64_t>(64, N / 8));
      K = sum(segs[0], n0) / static_cast<acc_t>(n0);
    }
    for (int64_t s = 0; s < segments; ++s) {
      acc_t seg_d, seg_d2;
      shifted_sums(segs[s], C, K, seg_d, seg_d2);
      sum_d += seg_d;
      sum_d2 += seg_d2;
    }
    merge::corrected_moments(sum_d, sum_d2, count, norm, mean, var);
    mean += K;
    rstd = rstd_of(var);
  }

  // The per-token work takes everything by value: the kernels' vector stores may alias any memory, so values
  // read through the parallel lambda's captures would be reloaded after every store of the inner loops.

  // Normalizes token x [C] into y [C] with statistics mean, rstd (weight and bias [C] in block order, bias may
  // be null); prefetches the token read next, next_x.
  template <typename table_t>
  static VLFUSE_ROW_INLINE void normalize_token(const scalar_t* x, scalar_t* y, const table_t* weight,
                                                const table_t* bias, int64_t C, acc_t mean, acc_t rstd,
                                                const scalar_t* next_x, bool stream) {
    const fVec mv(mean), rv(rstd);
    for_blocks(C, [&](int64_t i, auto n, auto) VLFUSE_ROW_INLINE_LAMBDA {
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

  // One token of a backward walk: its input, output gradient and input gradient (null when not wanted), the
  // forward statistics of its normalized row (mean 0 for RMSNorm), and that row's means of the input
  // gradient's two sums (from grad_sums).
  struct GradToken {
    const scalar_t* x;
    const scalar_t* dy;
    scalar_t* dx;
    acc_t mean, rstd;
    acc_t mean_g = 0, mean_gx = 0;
  };

  // First backward pass over a token, from memory: sum_g = sum(g) and sum_gxc = sum(g * (x - mean)) with
  // g = dy * w (weight: the token's [C] part, in block order). The row means are mean_g = sum_g / N and
  // mean_gx = rstd * sum_gxc / N over the N values of the normalized row.
  static inline void grad_sums(const GradToken& t, const acc_t* weight, int64_t C, acc_t& sum_g, acc_t& sum_gxc) {
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
    sum_g = reduce(sg);
    sum_gxc = reduce(sgx);
  }

  // Sets t's row means from the sums of grad_sums over its normalized row of N values.
  static inline void set_grad_means(GradToken& t, acc_t sum_g, acc_t sum_gxc, int64_t N, Norm norm) {
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    t.mean_g = norm == Norm::LayerNorm ? sum_g * inv_n : acc_t(0);
    t.mean_gx = sum_gxc * t.rstd * inv_n;
  }

  // Second backward pass over G tokens together, from cache (grad_sums has just read them): writes each dx and
  // adds dy * xhat and dy to the partial sums pw and pb [C] (when not null; all in block order). Going over G
  // tokens per block loads the weight and loads and stores the partial sums once per G tokens: once per token,
  // they were over a third of this pass's instructions. Prefetches the G tokens read next (next), so that their
  // grad_sums do not wait on memory and memory is kept busy while this pass runs from cache.
  template <int G>
  static VLFUSE_ROW_INLINE void grad_pass(const GradToken* tokens, const GradToken* next, const acc_t* weight,
                                          int64_t C, acc_t* pw, acc_t* pb, bool stream) {
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
    for_blocks(C, [&](int64_t i, auto n, auto) VLFUSE_ROW_INLINE_LAMBDA {
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

inline merge::RowWindow<int64_t> window_of(const Params& p, int64_t r) {
  return merge::row_window<int64_t>(p.order, r, p.merge_size, p.grid, p.grid_stride0, p.grid_stride1, p.offsets,
                                    p.items);
}

template <typename scalar_t>
void forward_impl(const Params& p) {
  using R = Row<scalar_t>;
  using acc_t = typename R::acc_t;
  const int64_t C = p.channels, mm = p.merge_size * p.merge_size, rows = p.tokens / mm;
  const int64_t segments = p.postshuffle ? mm : 1;  // [C] segments of the weight and bias
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* mean_out = static_cast<acc_t*>(p.mean);
  auto* rstd_out = static_cast<acc_t*>(p.rstd);
  std::vector<acc_t> weight_storage, bias_storage;
  const acc_t* weight = R::block_order(static_cast<const acc_t*>(p.weight), C, segments, weight_storage);
  const acc_t* bias = R::block_order(static_cast<const acc_t*>(p.bias), C, segments, bias_storage);
  const int64_t grain = std::max<int64_t>(1, 32768 / (mm * C));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain);
  const bool stream =
      cpu::prefer_streaming_stores(2 * p.tokens * C * static_cast<int64_t>(sizeof(scalar_t)), threads);
  // The post-shuffle norm's tables are [mm * C]: in float32 (36 KiB for 4 x 1152, weight and bias) they no
  // longer fit a 32 KiB L1 beside the window they normalize. Where every value is exact in the tokens' reduced
  // type they are kept in that type, half the bytes: as given, when the weights come in it (as models ship
  // them), else rounded and checked here.
  std::vector<scalar_t> reduced_storage;
  const scalar_t* reduced_weight = nullptr;
  const scalar_t* reduced_bias = nullptr;
  if constexpr (R::IO::kReduced) {
    if (p.postshuffle && p.weight_reduced != nullptr) {
      reduced_weight = static_cast<const scalar_t*>(p.weight_reduced);
      reduced_bias = static_cast<const scalar_t*>(p.bias_reduced);
    } else if (p.postshuffle) {
      const auto* w = static_cast<const acc_t*>(p.weight);
      const auto* b = static_cast<const acc_t*>(p.bias);
      const int64_t n = mm * C;
      reduced_storage.resize(b != nullptr ? 2 * n : n);
      bool exact = true;
      for (int64_t i = 0; i < static_cast<int64_t>(reduced_storage.size()); ++i) {
        const acc_t value = i < n ? w[i] : b[i - n];
        reduced_storage[i] = static_cast<scalar_t>(value);
        exact = exact && static_cast<acc_t>(reduced_storage[i]) == value;
      }
      if (exact) {
        reduced_weight = reduced_storage.data();
        reduced_bias = b != nullptr ? reduced_storage.data() + n : nullptr;
      }
    }
  }

  // One walk per norm kind (kPostshuffle): each parallel body holds one row loop, small enough for the
  // compiler to keep inlining the row passes into it (with both, they went out of line and the per-token
  // walk ran half again as long).
  const auto walk = [&](auto postshuffle) {
    constexpr bool kPostshuffle = decltype(postshuffle)::value;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> window(mm);
      for (int64_t r = begin; r < end; ++r) {
        const merge::RowWindow<int64_t> win = window_of(p, r);
        for (int64_t k = 0; k < mm; ++k) {
          window[k] = x + win.token(k) * p.x_stride;
        }
        const merge::RowWindow<int64_t> next_win = window_of(p, std::min(r + 1, rows - 1));
        scalar_t* y = out + r * mm * C;
        acc_t mean, rstd;
        if constexpr (kPostshuffle) {
          R::stats(window.data(), mm, C, p.norm, p.eps, mean, rstd);
          for (int64_t k = 0; k < mm; ++k) {
            // Slot k's pass prefetches the next row's slot k: the tokens that row's statistics pass reads.
            const scalar_t* next_x = x + next_win.token(k) * p.x_stride;
            if (reduced_weight != nullptr) {
              R::normalize_token(window[k], y + k * C, reduced_weight + k * C,
                                 reduced_bias != nullptr ? reduced_bias + k * C : nullptr, C, mean, rstd, next_x,
                                 stream);
            } else {
              R::normalize_token(window[k], y + k * C, weight + k * C, bias != nullptr ? bias + k * C : nullptr, C,
                                 mean, rstd, next_x, stream);
            }
          }
          if (mean_out != nullptr) {
            mean_out[r] = mean;
          }
          rstd_out[r] = rstd;
        } else {
          for (int64_t k = 0; k < mm; ++k) {
            R::stats(&window[k], 1, C, p.norm, p.eps, mean, rstd);
            const scalar_t* next_x = k + 1 < mm ? window[k + 1] : x + next_win.token(0) * p.x_stride;
            R::normalize_token(window[k], y + k * C, weight, bias, C, mean, rstd, next_x, stream);
            const int64_t tok = win.token(k);
            if (mean_out != nullptr) {
              mean_out[tok] = mean;
            }
            rstd_out[tok] = rstd;
          }
        }
      }
      if (stream) {
        cpu::stream_fence();
      }
    });
  };
  if (p.postshuffle) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }
}

// Tokens per second backward pass (Row::grad_pass): 4 tokens' x and dy (20 KB in bf16, 40 KB in fp32 at
// C = 1280) are still in L1/L2 when it rereads them. With postshuffle, rows per group: each slot's pass
// rereads kGradGroup of the m^2 * kGradGroup tokens whose row sums were just taken (L2).
constexpr int kGradGroup = 4;

template <typename scalar_t>
void backward_impl(const Params& p) {
  using R = Row<scalar_t>;
  using acc_t = typename R::acc_t;
  using fVec = typename R::fVec;
  constexpr int64_t W = R::W;
  const int64_t C = p.channels, mm = p.merge_size * p.merge_size, rows = p.tokens / mm;
  const int64_t segments = p.postshuffle ? mm : 1;  // [C] segments of the weight and its gradients
  const int64_t P = segments * C;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out);
  auto* grad_x = static_cast<scalar_t*>(p.grad_x);
  const auto* mean_in = static_cast<const acc_t*>(p.mean);
  const auto* rstd_in = static_cast<const acc_t*>(p.rstd);
  std::vector<acc_t> weight_storage;
  const acc_t* weight = R::block_order(static_cast<const acc_t*>(p.weight), C, segments, weight_storage);
  const bool want_w = p.grad_weight != nullptr, want_b = p.grad_bias != nullptr;
  // A fixed split into at most 32 chunks (not one per thread), so the partial sums, and hence the weight and
  // bias gradients, do not depend on the thread count. A chunk takes at least kChunkValues values of x: its
  // [2, P] partial sums are then a small part of its work (with postshuffle, P is a whole merged row), where
  // chunks of a few rows spent more time zeroing and reducing the partial sums than on the rows.
  constexpr int64_t kChunkValues = int64_t{1} << 18;
  const int64_t rows_per_chunk = std::max<int64_t>((rows + 31) / 32, std::max<int64_t>(1, kChunkValues / (mm * C)));
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  // Each chunk's [2, P] partial sums (weight, bias; in block order) are zeroed by the thread that fills them.
  std::unique_ptr<acc_t[]> partial(want_w || want_b ? new acc_t[chunks * 2 * P] : nullptr);
  // x and grad_out read, grad_x written.
  const bool stream = grad_x != nullptr &&
                      cpu::prefer_streaming_stores(3 * p.tokens * C * static_cast<int64_t>(sizeof(scalar_t)),
                                                   std::min<int64_t>(at::get_num_threads(), chunks));

  using GradToken = typename R::GradToken;
  // Token of slot k of row r, with that token's statistics (per-token norm) or row r's (postshuffle).
  const auto grad_token = [&](const merge::RowWindow<int64_t>& win, int64_t k) {
    const int64_t tok = win.token(k), stat = p.postshuffle ? win.r : tok;
    return GradToken{x + tok * p.x_stride, grad_out + win.r * p.grad_out_stride + k * C,
                     grad_x != nullptr ? grad_x + tok * C : nullptr, mean_in != nullptr ? mean_in[stat] : acc_t(0),
                     rstd_in[stat]};
  };
  const auto grad_token_at = [&](int64_t q) { return grad_token(window_of(p, q / mm), q % mm); };

  // One walk per norm kind (kPostshuffle): each parallel body holds one row loop, small enough for the
  // compiler to keep inlining the row passes into it (with both, they went out of line and the per-token
  // walk ran half again as long).
  const auto walk = [&](auto postshuffle) {
    constexpr bool kPostshuffle = decltype(postshuffle)::value;
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        acc_t* pw = partial ? partial.get() + chunk * 2 * P : nullptr;
        acc_t* pb = pw == nullptr ? nullptr : pw + P;
        if (pw != nullptr) {
          std::fill(pw, pw + 2 * P, acc_t(0));
        }
        const int64_t r_end = std::min(rows, (chunk + 1) * rows_per_chunk);
        if constexpr (kPostshuffle) {
          // G rows at a time: their row sums over all m^2 tokens, then one grad_pass per window slot.
          int64_t r = chunk * rows_per_chunk;
          const auto run_rows = [&](auto group_size) {
            constexpr int G = decltype(group_size)::value;
            merge::RowWindow<int64_t> win[G], next_win[G];
            GradToken row_stats[G];
            for (int g = 0; g < G; ++g) {
              win[g] = window_of(p, r + g);
              next_win[g] = window_of(p, std::min(r + G + g, rows - 1));
              row_stats[g] = grad_token(win[g], 0);
              if (grad_x != nullptr) {
                acc_t sum_g = 0, sum_gxc = 0;
                for (int64_t k = 0; k < mm; ++k) {
                  acc_t sg, sgx;
                  R::grad_sums(grad_token(win[g], k), weight + k * C, C, sg, sgx);
                  sum_g += sg;
                  sum_gxc += sgx;
                }
                R::set_grad_means(row_stats[g], sum_g, sum_gxc, P, p.norm);
              }
            }
            for (int64_t k = 0; k < mm; ++k) {
              GradToken group[G], next[G];
              for (int g = 0; g < G; ++g) {
                group[g] = grad_token(win[g], k);
                group[g].mean_g = row_stats[g].mean_g;
                group[g].mean_gx = row_stats[g].mean_gx;
                next[g] = grad_token(next_win[g], k);
              }
              R::template grad_pass<G>(group, next, weight + k * C, C, want_w ? pw + k * C : nullptr,
                                       want_b ? pb + k * C : nullptr, stream);
            }
            r += G;
          };
          while (r + kGradGroup <= r_end) {
            run_rows(std::integral_constant<int, kGradGroup>{});
          }
          while (r < r_end) {
            run_rows(std::integral_constant<int, 1>{});
          }
        } else {
          // The chunk's walk positions q = r * m^2 + k, in groups of kGradGroup (then single tokens) per
          // second pass.
          const int64_t q_end = r_end * mm;
          int64_t q = chunk * rows_per_chunk * mm;
          const auto run_group = [&](auto group_size) {
            constexpr int G = decltype(group_size)::value;
            GradToken group[G], next[G];
            for (int g = 0; g < G; ++g) {
              group[g] = grad_token_at(q + g);
              next[g] = grad_token_at(std::min(q + G + g, p.tokens - 1));
              if (grad_x != nullptr) {
                acc_t sum_g, sum_gxc;
                R::grad_sums(group[g], weight, C, sum_g, sum_gxc);
                R::set_grad_means(group[g], sum_g, sum_gxc, C, p.norm);
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
      }
      if (stream) {
        cpu::stream_fence();
      }
    });
  };
  if (p.postshuffle) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }

  if (!partial) {
    return;
  }
  acc_t* outs[2] = {static_cast<acc_t*>(p.grad_weight), static_cast<acc_t*>(p.grad_bias)};
  std::vector<acc_t> total(P);
  for (int which = 0; which < 2; ++which) {
    if (outs[which] == nullptr) {
      continue;
    }
    acc_t* sum = cpu::BlockIO<scalar_t>::kPermuted ? total.data() : outs[which];
    // Each column sums its chunks in chunk order, whichever thread takes it.
    at::parallel_for(0, (P + W - 1) / W, 64, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t c = block_begin * W; c < std::min(P, block_end * W); c += W) {
        const int64_t n = std::min<int64_t>(W, P - c);
        fVec acc(acc_t(0));
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          acc = acc + fVec::loadu(partial.get() + (chunk * 2 + which) * P + c, n);
        }
        acc.store(sum + c, n);
      }
    });
    if (cpu::BlockIO<scalar_t>::kPermuted) {
      for (int64_t s = 0; s < segments; ++s) {
        cpu::reorder_blocks<scalar_t>(total.data() + s * C, C, outs[which] + s * C, /*to_block=*/false);
      }
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
