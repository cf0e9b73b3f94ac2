// The CPU kernel of attention within packed segments (see attention.h). A work item is one segment, one head and
// a range of its query rows. It packs the segment's keys and values once for the dot-product instruction, then
// takes kQBlock query rows at a time through the keys kKBlock at a time: scores S = scale * Q K^T in register
// tiles, the online softmax over S giving P, then O = alpha * O + P V in register tiles. Two operand formats:
//  - PairDot (bfloat16, in the AVX512_BF16 build): bfloat16 pairs in 32-bit lanes, vdpbf16ps (two products per
//    lane, summed in float32); P is rounded to bfloat16 for the P V product, as GPU flash attention does.
//  - FloatDot (every other type and ISA): float32 operands and FMA; reduced types are widened when packed.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_vec.h"

namespace vlfuse::VLFUSE_ISA_NS {

namespace {

using ::vlfuse::attention::Params;
using fVec = at::vec::Vectorized<float>;

constexpr int64_t kLanes = fVec::size();
constexpr int kTileRows = 4;
// Accumulator registers one tile may use: the rest of the register file holds its operands.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxAccumulators = 24;
#else
constexpr int kMaxAccumulators = 12;
#endif
// Score tiles are kTileRows x kKeyVectors registers, a power of two so that kKBlock is a whole number of tiles.
constexpr int kKeyVectors = kMaxAccumulators / kTileRows >= 4 ? 4 : 2;
constexpr int64_t kKeyTile = kKeyVectors * kLanes;
constexpr int64_t kQBlock = 64;
constexpr int64_t kKBlock = 256;
static_assert(kKBlock % kKeyTile == 0 && kQBlock % kTileRows == 0);
constexpr int kMaxValueVectors = kMaxAccumulators / kTileRows;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Packed keys are stored a score tile at a time, [tiles][depth][kKeyTile]: a tile's operands are one contiguous
// run. (Rows of all keys, [depth][keys], put a tile's successive loads a whole key row apart: 4 or 8 KiB for 1024
// or 2048 keys, all in one L1 set, which evicted each other.) The offset of key n's first element:
inline int64_t key_tile_offset(int64_t n, int64_t depth) {
  return (n / kKeyTile) * depth * kKeyTile + n % kKeyTile;
}

// Float32 operands: one value per lane, FMA.
struct FloatDot {
  using Packed = float;
  using Operand = fVec;
  static constexpr int64_t kPerLane = 1;
  static Operand load(const Packed* p) { return fVec::loadu(p); }
  static Operand broadcast(const Packed* p) { return fVec(*p); }
  static fVec madd(const fVec& acc, const Operand& a, const Operand& b) { return at::vec::fmadd(a, b, acc); }

  template <typename scalar_t>
  static void pack_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, Packed* dst, int64_t ld,
                        int64_t padded_rows) {
    for (int64_t r = 0; r < padded_rows; ++r) {
      Packed* d = dst + r * ld;
      if (r < rows) {
        for (int64_t c = 0; c < D; ++c) {
          d[c] = static_cast<float>(src[r * stride + c]);
        }
      }
      std::fill(d + (r < rows ? D : 0), d + ld, 0.f);
    }
  }
  // Kt in key tiles (see key_tile_offset): Kt[tile][d][n % kKeyTile] = K[n][d]
  template <typename scalar_t>
  static void pack_keys(const scalar_t* k, int64_t stride, int64_t L, int64_t D, Packed* kt, int64_t padded_len) {
    std::fill(kt + (L / kKeyTile) * D * kKeyTile, kt + padded_len * D, 0.f);
    for (int64_t n = 0; n < L; ++n) {
      Packed* dst = kt + key_tile_offset(n, D);
      for (int64_t d = 0; d < D; ++d) {
        dst[d * kKeyTile] = static_cast<float>(k[n * stride + d]);
      }
    }
  }
  // Vp[n][d] = V[n][d], rows padded to ld and to padded_rows with zeros
  template <typename scalar_t>
  static void pack_values(const scalar_t* v, int64_t stride, int64_t L, int64_t D, Packed* vp, int64_t ld,
                          int64_t padded_rows) {
    pack_rows(v, stride, L, D, vp, ld, padded_rows);
  }
  static void store_probabilities(Packed* p, const fVec& lo, const fVec& hi) {
    lo.store(p);
    hi.store(p + kLanes);
  }
};

#if defined(VLFUSE_ISA_AVX512_BF16)
// bfloat16 pairs: lane i of an operand holds elements 2i and 2i + 1 of the summed axis, vdpbf16ps.
struct PairDot {
  using Packed = uint32_t;
  using Operand = __m512i;
  static constexpr int64_t kPerLane = 2;
  static Operand load(const Packed* p) { return _mm512_loadu_si512(p); }
  static Operand broadcast(const Packed* p) { return _mm512_set1_epi32(static_cast<int>(*p)); }
  static fVec madd(const fVec& acc, const Operand& a, const Operand& b) {
    return _mm512_dpbf16_ps(__m512(acc), (__m512bh)a, (__m512bh)b);
  }

  // Rows of D bfloat16 as ceil(D / 2) pairs (an odd D gets a zero partner), padded to ld pairs.
  static void pack_rows(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t D, Packed* dst, int64_t ld,
                        int64_t padded_rows) {
    for (int64_t r = 0; r < padded_rows; ++r) {
      auto* d = reinterpret_cast<c10::BFloat16*>(dst + r * ld);
      const int64_t filled = r < rows ? D : 0;
      if (filled) {
        std::memcpy(d, src + r * stride, D * sizeof(c10::BFloat16));
      }
      std::fill(d + filled, d + 2 * ld, c10::BFloat16(0.f));
    }
  }
  // Kt in key tiles (see key_tile_offset): Kt[tile][p][n % kKeyTile] = (K[n][2p], K[n][2p + 1])
  static void pack_keys(const c10::BFloat16* k, int64_t stride, int64_t L, int64_t D, Packed* kt, int64_t padded_len) {
    const int64_t pairs = (D + 1) / 2;
    std::fill(kt + (L / kKeyTile) * pairs * kKeyTile, kt + padded_len * pairs, 0u);
    for (int64_t n = 0; n < L; ++n) {
      const auto* row = reinterpret_cast<const uint16_t*>(k + n * stride);
      Packed* dst = kt + key_tile_offset(n, pairs);
      for (int64_t p = 0; p < D / 2; ++p) {
        uint32_t pair;
        std::memcpy(&pair, row + 2 * p, sizeof(pair));
        dst[p * kKeyTile] = pair;
      }
      if (D % 2) {
        dst[(pairs - 1) * kKeyTile] = row[D - 1];
      }
    }
  }
  // Vp[p][d] = (V[2p][d], V[2p + 1][d]): two rows interleaved 16 bits at a time, rows past L zero
  static void pack_values(const c10::BFloat16* v, int64_t stride, int64_t L, int64_t D, Packed* vp, int64_t ld,
                          int64_t padded_rows) {
    std::memset(vp, 0, static_cast<size_t>(padded_rows / 2 * ld) * sizeof(Packed));
    for (int64_t n = 0; n < L; ++n) {
      const auto* row = reinterpret_cast<const uint16_t*>(v + n * stride);
      auto* dst = reinterpret_cast<uint16_t*>(vp + (n / 2) * ld) + (n % 2);
      for (int64_t d = 0; d < D; ++d) {
        dst[2 * d] = row[d];
      }
    }
  }
  static void store_probabilities(Packed* p, const fVec& lo, const fVec& hi) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(__m512(hi), __m512(lo)));
  }
};
#endif

// acc[r][j] += sum over steps s of a[r][s] * b[s][j-th vector]: the register tile both products are made of.
template <class Dot, int R, int NV>
inline void dot_tile(const typename Dot::Packed* a, int64_t lda, const typename Dot::Packed* b, int64_t ldb,
                     int64_t steps, fVec (&acc)[R][NV]) {
  for (int64_t s = 0; s < steps; ++s) {
    typename Dot::Operand bv[NV];
    for (int j = 0; j < NV; ++j) {
      bv[j] = Dot::load(b + s * ldb + j * kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const typename Dot::Operand av = Dot::broadcast(a + r * lda + s);
      for (int j = 0; j < NV; ++j) {
        acc[r][j] = Dot::madd(acc[r][j], av, bv[j]);
      }
    }
  }
}

// O[r][cols] = alpha[r] * O[r][cols] + P[r][:] V[:][cols] for kTileRows rows and NV vectors of columns.
template <class Dot, int NV>
inline void value_tile(const typename Dot::Packed* p, int64_t ldp, const typename Dot::Packed* vp, int64_t ldv,
                       int64_t steps, const float* alpha, float* o, int64_t ldo) {
  fVec acc[kTileRows][NV];
  for (int r = 0; r < kTileRows; ++r) {
    const fVec a(alpha[r]);
    for (int j = 0; j < NV; ++j) {
      acc[r][j] = fVec::loadu(o + r * ldo + j * kLanes) * a;
    }
  }
  dot_tile<Dot, kTileRows, NV>(p, ldp, vp, ldv, steps, acc);
  for (int r = 0; r < kTileRows; ++r) {
    for (int j = 0; j < NV; ++j) {
      acc[r][j].store(o + r * ldo + j * kLanes);
    }
  }
}

template <class Dot>
void value_tile_columns(int vectors, const typename Dot::Packed* p, int64_t ldp, const typename Dot::Packed* vp,
                        int64_t ldv, int64_t steps, const float* alpha, float* o, int64_t ldo) {
  static_assert(kMaxValueVectors <= 6);
  switch (vectors) {
    case 1: return value_tile<Dot, 1>(p, ldp, vp, ldv, steps, alpha, o, ldo);
    case 2: return value_tile<Dot, 2>(p, ldp, vp, ldv, steps, alpha, o, ldo);
    case 3: return value_tile<Dot, 3>(p, ldp, vp, ldv, steps, alpha, o, ldo);
#if defined(CPU_CAPABILITY_AVX512)
    case 4: return value_tile<Dot, 4>(p, ldp, vp, ldv, steps, alpha, o, ldo);
    case 5: return value_tile<Dot, 5>(p, ldp, vp, ldv, steps, alpha, o, ldo);
    case 6: return value_tile<Dot, 6>(p, ldp, vp, ldv, steps, alpha, o, ldo);
#endif
    default: TORCH_INTERNAL_ASSERT(false, "vlfuse.segment_attention: value tile of ", vectors, " vectors");
  }
}

// One thread's buffers, sized for the longest segment.
template <class Dot>
struct Scratch {
  using Packed = typename Dot::Packed;
  int64_t depth;          // packed elements along the head dimension
  int64_t key_stride;     // the longest segment's keys padded to a whole score tile
  int64_t value_stride;   // Vp row length: the head dimension padded to whole vectors
  std::vector<Packed> q, kt, vp, p;
  std::vector<float> s, o, m, l, alpha;

  Scratch(int64_t max_len, int64_t D) {
    depth = (D + Dot::kPerLane - 1) / Dot::kPerLane;
    key_stride = round_up(max_len, kKeyTile);
    value_stride = round_up(D, kLanes);
    q.resize(kQBlock * depth);
    kt.resize(depth * key_stride);
    vp.resize(key_stride / Dot::kPerLane * value_stride);
    p.resize(kQBlock * kKBlock / Dot::kPerLane);
    s.resize(kQBlock * kKBlock);
    o.resize(kQBlock * value_stride);
    m.resize(kQBlock);
    l.resize(kQBlock);
    alpha.resize(kQBlock);
  }
};

// Query rows [q_begin, q_end) of one segment of length L and one head.
template <class Dot, typename scalar_t>
void attend_rows(const scalar_t* q, int64_t qs, const scalar_t* k, int64_t ks, const scalar_t* v, int64_t vs,
                 int64_t L, int64_t D, int64_t q_begin, int64_t q_end, float scale, scalar_t* out, int64_t outs,
                 float* lse, Scratch<Dot>& w) {
  using Packed = typename Dot::Packed;
  const int64_t depth = w.depth;
  const int64_t kld = round_up(L, kKeyTile);
  const int64_t vld = w.value_stride;
  const int64_t pld = kKBlock / Dot::kPerLane;
  const int value_vectors = static_cast<int>(vld / kLanes);
  const int value_chunks = (value_vectors + kMaxValueVectors - 1) / kMaxValueVectors;
  Dot::pack_keys(k, ks, L, D, w.kt.data(), kld);
  Dot::pack_values(v, vs, L, D, w.vp.data(), vld, kld);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  for (int64_t q0 = q_begin; q0 < q_end; q0 += kQBlock) {
    const int64_t rows = std::min(kQBlock, q_end - q0);
    const int64_t tile_rows = round_up(rows, kTileRows);
    Dot::pack_rows(q + q0 * qs, qs, rows, D, w.q.data(), depth, tile_rows);
    std::fill(w.m.begin(), w.m.end(), kNegInf);
    std::fill(w.l.begin(), w.l.end(), 0.f);
    std::fill(w.o.begin(), w.o.begin() + tile_rows * vld, 0.f);

    for (int64_t k0 = 0; k0 < L; k0 += kKBlock) {
      const int64_t keys = std::min(kKBlock, L - k0);
      const int64_t padded_keys = round_up(keys, kKeyTile);
      const fVec scale_vec(scale);
      // tile by tile of keys, so that each key tile stays in L1 while every query row meets it
      for (int64_t c0 = 0; c0 < padded_keys; c0 += kKeyTile) {
        for (int64_t r0 = 0; r0 < tile_rows; r0 += kTileRows) {
          fVec acc[kTileRows][kKeyVectors];
          for (auto& row : acc) {
            for (auto& x : row) {
              x = fVec(0.f);
            }
          }
          dot_tile<Dot, kTileRows, kKeyVectors>(w.q.data() + r0 * depth, depth,
                                               w.kt.data() + key_tile_offset(k0 + c0, depth), kKeyTile, depth,
                                               acc);
          for (int r = 0; r < kTileRows; ++r) {
            for (int j = 0; j < kKeyVectors; ++j) {
              (acc[r][j] * scale_vec).store(w.s.data() + (r0 + r) * kKBlock + c0 + j * kLanes);
            }
          }
        }
      }
      for (int64_t r = 0; r < tile_rows; ++r) {
        float* srow = w.s.data() + r * kKBlock;
        std::fill(srow + keys, srow + padded_keys, kNegInf);
        fVec peak(kNegInf);
        for (int64_t c = 0; c < padded_keys; c += kLanes) {
          peak = at::vec::maximum(peak, fVec::loadu(srow + c));
        }
        const float m_new = std::max(w.m[r], at::vec::vec_reduce_all<float>(
                                                 [](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); },
                                                 peak));
        w.alpha[r] = ::vlfuse::attention::rescale_factor(w.m[r], m_new);
        const fVec shift(m_new);
        fVec sum(0.f);
        Packed* prow = w.p.data() + r * pld;
        for (int64_t c = 0; c < padded_keys; c += 2 * kLanes) {
          const fVec lo = (fVec::loadu(srow + c) - shift).exp_u20();
          const fVec hi = (fVec::loadu(srow + c + kLanes) - shift).exp_u20();
          sum = sum + lo + hi;
          Dot::store_probabilities(prow + c / Dot::kPerLane, lo, hi);
        }
        w.l[r] = w.l[r] * w.alpha[r] + at::vec::vec_reduce_all<float>(
                                           [](const fVec& a, const fVec& b) { return a + b; }, sum);
        w.m[r] = m_new;
      }
      const Packed* vblock = w.vp.data() + k0 / Dot::kPerLane * vld;
      for (int64_t r0 = 0; r0 < tile_rows; r0 += kTileRows) {
        int first = 0;
        for (int chunk = 0; chunk < value_chunks; ++chunk) {
          const int width = (value_vectors - first) / (value_chunks - chunk);
          value_tile_columns<Dot>(width, w.p.data() + r0 * pld, pld, vblock + first * kLanes, vld,
                                  padded_keys / Dot::kPerLane, w.alpha.data() + r0, w.o.data() + r0 * vld + first * kLanes,
                                  vld);
          first += width;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const fVec inv(1.f / w.l[r]);
      const float* orow = w.o.data() + r * vld;
      scalar_t* dst = out + (q0 + r) * outs;
      int64_t c = 0;
      for (; c + kLanes <= D; c += kLanes) {
        cpu::store_acc_vec(dst + c, fVec::loadu(orow + c) * inv);
      }
      if (c < D) {
        cpu::store_acc_vec(dst + c, fVec::loadu(orow + c) * inv, D - c);
      }
      lse[q0 + r] = ::vlfuse::attention::row_logsumexp(w.m[r], w.l[r]);
    }
  }
}

template <class Dot, typename scalar_t>
void run(const Params& p) {
  const int64_t H = p.heads;
  const int64_t D = p.head_dim;
  int64_t segments = 0;
  int64_t max_len = 0;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    segments += p.groups[3 * g + 1];
    max_len = std::max(max_len, p.groups[3 * g + 2]);
  }
  if (segments == 0) {
    return;
  }
  // Long segments are cut into query ranges when there are too few (segment, head) pairs to keep every thread
  // busy; each range packs the segment's keys and values again, which costs one pass over them.
  const int64_t threads = at::get_num_threads();
  const int64_t want = 4 * threads;
  const int64_t base = segments * H;
  std::vector<int64_t> splits(p.num_groups), first_item(p.num_groups + 1, 0);
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t len = p.groups[3 * g + 2];
    splits[g] = std::clamp<int64_t>((want + base - 1) / base, 1, (len + kQBlock - 1) / kQBlock);
    first_item[g + 1] = first_item[g] + p.groups[3 * g + 1] * H * splits[g];
  }
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  // Each thread takes a contiguous range of items holding an equal share of the work (items cost their query
  // rows times their keys): the plan sorts segments by length, so equal item counts would hand one thread all
  // the long segments.
  std::vector<double> item_cost(p.num_groups), first_cost(p.num_groups + 1, 0.0);
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t len = p.groups[3 * g + 2];
    item_cost[g] = static_cast<double>((len + splits[g] - 1) / splits[g]) * static_cast<double>(len);
    first_cost[g + 1] = first_cost[g] + item_cost[g] * static_cast<double>(first_item[g + 1] - first_item[g]);
  }
  // The first item whose middle lies at or past `cost`.
  const auto first_item_at = [&](double cost) {
    for (int64_t g = 0; g < p.num_groups; ++g) {
      if (cost <= first_cost[g + 1]) {
        const double index = std::ceil((cost - first_cost[g]) / item_cost[g] - 0.5);
        return first_item[g] + std::clamp<int64_t>(static_cast<int64_t>(index), 0, first_item[g + 1] - first_item[g]);
      }
    }
    return first_item[p.num_groups];
  };
  const double total = first_cost[p.num_groups];
  at::parallel_for(0, threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
    Scratch<Dot> scratch(max_len, D);
    const int64_t begin = first_item_at(total * static_cast<double>(thread_begin) / static_cast<double>(threads));
    const int64_t end = thread_end == threads
                            ? first_item[p.num_groups]
                            : first_item_at(total * static_cast<double>(thread_end) / static_cast<double>(threads));
    int64_t g = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[g + 1]) {
        ++g;
      }
      const int64_t start = p.groups[3 * g];
      const int64_t len = p.groups[3 * g + 2];
      const int64_t local = item - first_item[g];
      const int64_t split = local % splits[g];
      const int64_t h = local / splits[g] % H;
      const int64_t seg = local / splits[g] / H;
      const int64_t rows_per_split = round_up((len + splits[g] - 1) / splits[g], kQBlock);
      const int64_t q_begin = std::min(len, split * rows_per_split);
      const int64_t q_end = std::min(len, q_begin + rows_per_split);
      if (q_begin == q_end) {
        continue;
      }
      const int64_t tok = start + seg * len;
      attend_rows<Dot>(q + h * p.q_stride_h + tok * p.q_stride_s, p.q_stride_s, k + h * p.k_stride_h + tok * p.k_stride_s,
                       p.k_stride_s, v + h * p.v_stride_h + tok * p.v_stride_s, p.v_stride_s, len, D, q_begin, q_end,
                       p.scale, out + tok * H * D + h * D, H * D, p.lse + h * p.tokens + tok, scratch);
    }
  });
}

}  // namespace

void segment_attention_cpu_kernel(const Params& p) {
  switch (static_cast<at::ScalarType>(p.dtype)) {
    case at::kFloat:
      return run<FloatDot, float>(p);
    case at::kHalf:
      return run<FloatDot, c10::Half>(p);
    case at::kBFloat16:
#if defined(VLFUSE_ISA_AVX512_BF16)
      return run<PairDot, c10::BFloat16>(p);
#else
      return run<FloatDot, c10::BFloat16>(p);
#endif
    default:
      TORCH_INTERNAL_ASSERT(false, "vlfuse.segment_attention: no CPU kernel for ", static_cast<at::ScalarType>(p.dtype));
  }
}

}  // namespace vlfuse::VLFUSE_ISA_NS
