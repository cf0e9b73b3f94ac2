// CPU position table resampling kernels. Compiled once per ISA (see CMakeLists.txt).
// Forward: parallel over tokens; a token's four weighted table rows are summed in accumulator vectors and its
// output row written once (streaming stores when the output outgrows the caches).
// Backward: parallel over table rows, each computed by one thread from the gradient rows of the tokens that read
// it (the inverse tap ranges of pos_embed.h), in a fixed order: deterministic, no shared partial buffers, every
// row written once. A row's terms (token, weight) are listed first, then summed a register tile of channels at a
// time.
// Both only combine rows lane by lane, so whole blocks go through cpu::BlockIO, whose lane order may be permuted
// (bfloat16 on AVX2: a load is a shift or a mask, where the natural order widens with shuffles); the bias is laid
// out in that order once per call, and a row's shorter last block takes VecIO's natural order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_vec.h"
#include "pos_embed/pos_embed.h"

namespace vlfuse::VLFUSE_ISA_NS {

using pos_embed::Params;

namespace {

// The item holding token tok: the last i with offsets[i] <= tok (the items before it may be empty).
int64_t item_of(const int64_t* offsets, int64_t items, int64_t tok) {
  return std::upper_bound(offsets, offsets + items, tok) - offsets - 1;
}

struct ItemGrid {
  int64_t t, h, w;
};

ItemGrid item_grid(const Params& p, int64_t item) {
  const int64_t* g = p.grid + item * p.grid_stride0;
  return {g[0], g[p.grid_stride1], g[2 * p.grid_stride1]};
}

// Loads or stores the block of n elements at p: a whole block (kWhole) in BlockIO's lane order, the shorter last
// block of a row in natural order.
template <typename scalar_t, bool kWhole>
struct Block {
  using IO = cpu::VecIO<scalar_t>;
  using fVec = typename IO::fVec;
  static inline void load(const scalar_t* p, int64_t n, fVec* v) {
    if constexpr (kWhole) {
      cpu::BlockIO<scalar_t>::load(p, v);
    } else {
      IO::load(p, n, v);
    }
  }
  static inline void store(scalar_t* p, int64_t n, const fVec* v, bool stream = false) {
    if constexpr (kWhole) {
      cpu::BlockIO<scalar_t>::store(p, v, stream);
    } else {
      IO::store(p, n, v, stream);
    }
  }
};

// Calls f(c, n, whole) for each block [c, c + n) of a row of C elements; whole is std::true_type for the blocks of
// IO::kBlock elements, std::false_type for a shorter last one.
template <typename scalar_t, typename F>
inline void for_blocks(int64_t C, F&& f) {
  constexpr int64_t kBlock = cpu::VecIO<scalar_t>::kBlock;
  int64_t c = 0;
  for (; c + kBlock <= C; c += kBlock) {
    f(c, kBlock, std::true_type{});
  }
  if (c < C) {
    f(c, C - c, std::false_type{});
  }
}

template <typename scalar_t>
void forward_impl(const Params& p) {
  using IO = cpu::VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using fVec = typename IO::fVec;
  constexpr int kParts = IO::kAccPerBlock;
  const int64_t C = p.channels;
  const auto* table = static_cast<const scalar_t*>(p.table);
  auto* out = static_cast<scalar_t*>(p.out);
  std::vector<acc_t> bias_blocked(p.bias != nullptr ? C : 0);
  if (p.bias != nullptr) {
    cpu::reorder_blocks<scalar_t>(static_cast<const acc_t*>(p.bias), C, bias_blocked.data(), /*to_block=*/true);
  }
  const acc_t* bias = p.bias != nullptr ? bias_blocked.data() : nullptr;
  const bool stream = cpu::prefer_streaming_stores(p.tokens * C * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, p.tokens, grain, [&](int64_t begin, int64_t end) {
    int64_t item = item_of(p.offsets, p.items, begin);
    for (int64_t tok = begin; tok < end; ++tok) {
      while (tok >= p.offsets[item + 1]) {
        ++item;
      }
      const ItemGrid g = item_grid(p, item);
      const auto taps = pos_embed::token_taps<int64_t>(tok - p.offsets[item], g.h, g.w, p.merge_size, p.side);
      const scalar_t* rows[4];
      fVec weight[4];
      for (int k = 0; k < 4; ++k) {
        rows[k] = table + taps.index[k] * p.table_stride;
        weight[k] = fVec(static_cast<acc_t>(taps.weight[k]));
      }
      scalar_t* dst = out + tok * C;
      for_blocks<scalar_t>(C, [&](int64_t c, int64_t n, auto whole) {
        using B = Block<scalar_t, decltype(whole)::value>;
        fVec acc[kParts], v[kParts];
        B::load(rows[0] + c, n, v);
        for (int q = 0; q < kParts; ++q) {
          acc[q] = v[q] * weight[0];
        }
        for (int k = 1; k < 4; ++k) {
          B::load(rows[k] + c, n, v);
          for (int q = 0; q < kParts; ++q) {
            acc[q] = at::vec::fmadd(v[q], weight[k], acc[q]);
          }
        }
        if (bias != nullptr) {
          cpu::load_acc<acc_t, kParts>(bias + c, n, v);
          for (int q = 0; q < kParts; ++q) {
            acc[q] = acc[q] + v[q];
          }
        }
        B::store(dst + c, n, acc, stream);
      });
    }
    if (stream) {
      cpu::stream_fence();
    }
  });
}

template <typename scalar_t>
void backward_impl(const Params& p) {
  using IO = cpu::VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using fVec = typename IO::fVec;
  constexpr int kParts = IO::kAccPerBlock;
  // Blocks summed at once per term: four accumulator vectors, enough independent adds to keep the FMA units busy.
  constexpr int kTile = 4 / kParts;
  const int64_t C = p.channels, side = p.side, m = p.merge_size;
  const auto* grad = static_cast<const scalar_t*>(p.grad_out);
  auto* grad_table = static_cast<scalar_t*>(p.grad_table);
  // first(0 .. side) of each item's h axis (slot 0) and w axis (slot 1), see pos_embed.h.
  const int64_t stride = side + 1;
  std::vector<int64_t> firsts(p.items * 2 * stride);
  for (int64_t item = 0; item < p.items; ++item) {
    const ItemGrid g = item_grid(p, item);
    if (g.t * g.h * g.w == 0) {
      continue;
    }
    for (int axis = 0; axis < 2; ++axis) {
      const int64_t n = axis == 0 ? g.h : g.w;
      for (int64_t i = 0; i <= side; ++i) {
        firsts[(item * 2 + axis) * stride + i] = pos_embed::first_target<int64_t>(i, n, side);
      }
    }
  }
  at::parallel_for(0, side * side, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, acc_t>> terms;
    for (int64_t cell = begin; cell < end; ++cell) {
      const int64_t i = cell / side, j = cell % side;
      terms.clear();
      for (int64_t item = 0; item < p.items; ++item) {
        const ItemGrid g = item_grid(p, item);
        if (g.t * g.h * g.w == 0) {
          continue;
        }
        int64_t row_begin[2], row_end[2], col_begin[2], col_end[2];
        pos_embed::tap_ranges<int64_t>(&firsts[(item * 2) * stride], i, g.h, side, row_begin, row_end);
        pos_embed::tap_ranges<int64_t>(&firsts[(item * 2 + 1) * stride], j, g.w, side, col_begin, col_end);
        for (int a = 0; a < 2; ++a) {
          for (int64_t r = row_begin[a]; r < row_end[a]; ++r) {
            const auto th = pos_embed::axis_taps<int64_t>(r, g.h, side);
            const float w_row = a == 0 ? th.w_lo : th.w_hi;
            for (int b = 0; b < 2; ++b) {
              for (int64_t c = col_begin[b]; c < col_end[b]; ++c) {
                const auto tw = pos_embed::axis_taps<int64_t>(c, g.w, side);
                const float weight = w_row * (b == 0 ? tw.w_lo : tw.w_hi);
                const int64_t first = p.offsets[item] + pos_embed::merge_order_index<int64_t>(r, c, g.w, m);
                for (int64_t f = 0; f < g.t; ++f) {
                  terms.emplace_back(first + f * g.h * g.w, static_cast<acc_t>(weight));
                }
              }
            }
          }
        }
      }
      scalar_t* dst = grad_table + cell * C;
      // kTile whole blocks at a time, then the rest of the row (whole blocks and a shorter last one) one by one.
      const auto sum_terms = [&]<int kBlocks, bool kWhole>(int64_t c0, int64_t n) {
        using B = Block<scalar_t, kWhole>;
        fVec acc[kBlocks][kParts];
        for (int u = 0; u < kBlocks; ++u) {
          for (int q = 0; q < kParts; ++q) {
            acc[u][q] = fVec(acc_t(0));
          }
        }
        for (const auto& [token, weight] : terms) {
          const scalar_t* src = grad + token * p.grad_out_stride + c0;
          const fVec w(weight);
          for (int u = 0; u < kBlocks; ++u) {
            fVec v[kParts];
            B::load(src + u * IO::kBlock, n, v);
            for (int q = 0; q < kParts; ++q) {
              acc[u][q] = at::vec::fmadd(v[q], w, acc[u][q]);
            }
          }
        }
        for (int u = 0; u < kBlocks; ++u) {
          B::store(dst + c0 + u * IO::kBlock, n, acc[u]);
        }
      };
      int64_t c = 0;
      for (; c + kTile * IO::kBlock <= C; c += kTile * IO::kBlock) {
        sum_terms.template operator()<kTile, true>(c, IO::kBlock);
      }
      for (; c + IO::kBlock <= C; c += IO::kBlock) {
        sum_terms.template operator()<1, true>(c, IO::kBlock);
      }
      if (c < C) {
        sum_terms.template operator()<1, false>(c, C - c);
      }
    }
  });
}

}  // namespace

void pos_embed_forward_cpu_kernel(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.interp_pos_embed", [&] { forward_impl<scalar_t>(p); });
}

void pos_embed_backward_cpu_kernel(const Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.interp_pos_embed_backward", [&] { backward_impl<scalar_t>(p); });
}

}  // namespace vlfuse::VLFUSE_ISA_NS
