// CPU rotary kernel. Compiled once per ISA (see CMakeLists.txt); one pass over memory, parallel over tiles of
// tokens. A tile's coefficients (cos/sin per token and pair) are computed once into a small per-thread table
// and reused by every head of q and k. Rows are converted to and from float one accumulator vector at a time
// (8 elements on AVX2, 16 on AVX-512): a head_dim of 80 (40 pairs) has no partial vector on AVX2, and on AVX-512
// its last 8 pairs are done as the whole vector of pairs 24-39 (see rotate_row). Qwen3-VL's 72 (36 pairs) ends
// each half with such an overlapping vector too (pairs 28-35 on AVX2, 20-35 on AVX-512), or, bfloat16 on AVX2,
// with 4 pairs in 128-bit registers after two whole blocks (rotate_quarter): never a masked or scalar one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "rope/rope.h"

namespace vlfuse::VLFUSE_ISA_NS {

using at::vec::Vectorized;
using rope::AngleSource;
using rope::Params;

namespace {

// Tokens whose coefficients are computed together (vectorized across tokens); their table, 2 or 4 * tile * D/2
// floats, stays in L1.
constexpr int64_t kTileTokens = 16;

// Rows are walked token by token, so the packed [S, 3 * H * D] side is sequential; the [H, S, D] ("hsd") side
// (outputs of the forward, gradients read by the backward) scatters over 3 * H streams, more than the hardware
// prefetchers follow, and without help the accesses miss and stall. Every row of the token
// this far ahead is prefetched, for reading and for writing.
constexpr int64_t kPrefetchTokens = 2;

// Whether rows take BlockIO's permuted whole blocks: on AVX2, where the natural order costs cross-lane shuffles.
// AVX-512 converts a natural-order vector with one widening load, and the natural order lets a row's partial
// last vector be done overlapped (see rotate_row), so rows keep it there.
template <typename scalar_t>
constexpr bool kPermutedRows =
#if defined(CPU_CAPABILITY_AVX512)
    false;
#else
    cpu::BlockIO<scalar_t>::kPermuted;
#endif

// Pairs a permuted row ends with in 128-bit registers (rotate_quarter), after its whole blocks: half a float
// vector, as in Qwen3-VL's head_dim 72 (36 pairs: two 16-pair blocks and 4).
constexpr int64_t kQuarterPairs = 4;

// Pairs [0, block_extent) of a row go through BlockIO's permuted whole blocks (see rotate_row); the rest in
// natural order. All whole blocks, except that a rest shorter than a vector (and not kQuarterPairs), after a
// whole block, takes the last block back into the natural-order part, which then ends with an overlapping
// whole vector instead of a masked partial one.
template <typename scalar_t>
constexpr int64_t block_extent(int64_t half) {
  if constexpr (!kPermutedRows<scalar_t>) {
    return 0;
  } else {
    constexpr int64_t kBlock = cpu::VecIO<scalar_t>::kBlock;
    constexpr int64_t W = Vectorized<at::opmath_type<scalar_t>>::size();
    const int64_t whole = half / kBlock * kBlock, rest = half - whole;
    return rest % W != 0 && rest < W && rest != kQuarterPairs && whole > 0 ? whole - kBlock : whole;
  }
}

// Per-pair coefficients of one token (see rope.h). With angles, c2/s2 equal c1/s1 (kShared) and each vector of
// them is loaded once instead of twice.
template <typename acc_t>
struct TokenCoeffs {
  const acc_t* c1;
  const acc_t* s1;
  const acc_t* c2;
  const acc_t* s2;
};

template <bool kShared, typename acc_t>
inline void rotate_vec(const Vectorized<acc_t>& lo, const Vectorized<acc_t>& hi, const TokenCoeffs<acc_t>& c,
                       int64_t o, Vectorized<acc_t>& a, Vectorized<acc_t>& b) {
  using fVec = Vectorized<acc_t>;
  const fVec c1 = fVec::loadu(c.c1 + o);
  const fVec s1 = fVec::loadu(c.s1 + o);
  if constexpr (kShared) {
    rope::rotate_pair<fVec>(lo, hi, c1, s1, c1, s1, a, b);
  } else {
    rope::rotate_pair<fVec>(lo, hi, c1, s1, fVec::loadu(c.c2 + o), fVec::loadu(c.s2 + o), a, b);
  }
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// Rotates pairs [i, i + kQuarterPairs) of a bfloat16 row (natural order, in the row and in the coefficients)
// with 8-byte loads and stores of 128-bit registers: neither a partial 256-bit vector (a scalar loop through
// the stack on AVX2) nor an overlapping one (which would read coefficients the blocks before hold permuted).
template <bool kShared>
inline void rotate_quarter(const c10::BFloat16* x, c10::BFloat16* y, int64_t half, int64_t i,
                           const TokenCoeffs<float>& c, bool stream) {
  const auto load = [](const c10::BFloat16* p) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));  // a bfloat16 is a float's high half
  };
  const auto store = [stream](c10::BFloat16* p, __m128 v) {
    const __m128i packed = at::vec::cvtfp32_bf16(_mm256_zextps128_ps256(v));  // rounds to nearest even
    if (stream) {
      _mm_stream_si64(reinterpret_cast<long long*>(p), _mm_cvtsi128_si64(packed));
    } else {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p), packed);
    }
  };
  const __m128 c1 = _mm_loadu_ps(c.c1 + i), s1 = _mm_loadu_ps(c.s1 + i);
  const __m128 c2 = kShared ? c1 : _mm_loadu_ps(c.c2 + i), s2 = kShared ? s1 : _mm_loadu_ps(c.s2 + i);
  __m128 a, b;
  rope::rotate_pair<__m128>(load(x + i), load(x + half + i), c1, s1, c2, s2, a, b);
  store(y + i, a);
  store(y + half + i, b);
}
#endif

// kHalf: the pair count when the walk fixed it at compile time (see rope_impl), else 0 and runtime_half says it.
template <bool kShared, int64_t kHalf, typename scalar_t>
inline void rotate_row(const scalar_t* x, scalar_t* y, int64_t runtime_half,
                       const TokenCoeffs<at::opmath_type<scalar_t>>& c, bool stream) {
  const int64_t half = kHalf != 0 ? kHalf : runtime_half;
  using acc_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<acc_t>;
  using Block = cpu::BlockIO<scalar_t>;
  constexpr int64_t W = fVec::size();
  int64_t i = 0;
  if constexpr (kPermutedRows<scalar_t>) {
    const int64_t extent = block_extent<scalar_t>(half);
    // Whole blocks in BlockIO's lane order, which costs fewer conversion instructions than the natural order;
    // the coefficient rows are laid out the same way (permute_coeff_rows), and the rest of the row, shorter
    // than a block, is in natural order in both.
    constexpr int64_t kBlock = cpu::VecIO<scalar_t>::kBlock;
    constexpr int kParts = cpu::VecIO<scalar_t>::kAccPerBlock;
    for (; i < extent; i += kBlock) {
      fVec lo[kParts], hi[kParts], a[kParts], b[kParts];
      Block::load(x + i, lo);
      Block::load(x + half + i, hi);
      for (int j = 0; j < kParts; ++j) {
        rotate_vec<kShared>(lo[j], hi[j], c, i + j * W, a[j], b[j]);
      }
      Block::store(y + i, a, stream);
      Block::store(y + half + i, b, stream);
    }
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    if (half - i == kQuarterPairs) {
      rotate_quarter<kShared>(x, y, half, i, c, stream);
      return;
    }
#endif
  }
  // A partial last vector, when the natural-order part has a whole one before it, is done as the whole vector
  // that ends the row, overlapping its neighbour: masked stores are avoided, as a later load that touches a
  // masked store's full width waits for it to retire (in place, every row's first load did).
  // The overlap is written twice with the same bits (same inputs, same coefficients), and the last vector is
  // loaded before anything is stored, so an in-place row still reads only its original values.
  const int64_t rest = half - i;
  const bool overlap = rest % W != 0 && rest > W;
  fVec ta, tb;
  if (overlap) {
    const int64_t o = half - W;
    rotate_vec<kShared>(cpu::load_acc_vec(x + o), cpu::load_acc_vec(x + half + o), c, o, ta, tb);
  }
  for (; i + W <= half; i += W) {
    fVec a, b;
    rotate_vec<kShared>(cpu::load_acc_vec(x + i), cpu::load_acc_vec(x + half + i), c, i, a, b);
    cpu::store_acc_vec(y + i, a, stream);
    cpu::store_acc_vec(y + half + i, b, stream);
  }
  if (overlap) {
    cpu::store_acc_vec(y + half - W, ta, stream);
    cpu::store_acc_vec(y + 2 * half - W, tb, stream);
  } else if (i < half) {
    const int64_t n = half - i;
    const fVec c1 = fVec::loadu(c.c1 + i, n);
    const fVec s1 = fVec::loadu(c.s1 + i, n);
    fVec a, b;
    rope::rotate_pair<fVec>(cpu::load_acc_vec(x + i, n), cpu::load_acc_vec(x + half + i, n), c1, s1,
                            kShared ? c1 : fVec::loadu(c.c2 + i, n), kShared ? s1 : fVec::loadu(c.s2 + i, n), a, b);
    cpu::store_acc_vec(y + i, a, n, stream);
    cpu::store_acc_vec(y + half + i, b, n, stream);
  }
}

// Rows of at least one vector end with the whole vector that ends the row (loaded first, as in rotate_row),
// not a memcpy call per row.
template <int64_t kLen, typename scalar_t>
inline void copy_row(const scalar_t* x, scalar_t* y, int64_t runtime_len, bool stream) {
  const int64_t len = kLen != 0 ? kLen : runtime_len;
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  if (len < W) {
    std::memcpy(y, x, len * sizeof(scalar_t));
    return;
  }
  const Vec last = Vec::loadu(x + len - W);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    cpu::store_bytes(y + i, Vec::loadu(x + i), stream);
  }
  if (i < len) {
    cpu::store_bytes(y + len - W, last, stream);
  }
}

// Fills the coefficient table of tokens [s0, s0 + count): c1, s1 (and c2, s2 for cos/sin tables), each
// [count, half] at table + k * kTileTokens * half.
template <typename acc_t, typename pos_t>
void tile_coeffs(const Params& p, int64_t s0, int64_t count, acc_t* table) {
  using fVec = Vectorized<acc_t>;
  constexpr int64_t W = fVec::size();
  const int64_t half = p.half;
  const int64_t stride = kTileTokens * half;
  acc_t* c1 = table;
  acc_t* s1 = c1 + stride;
  if (p.source == AngleSource::Freqs) {
    const acc_t* freqs = static_cast<const acc_t*>(p.freqs);
    for (int64_t t = 0; t < count; ++t) {
      const pos_t* pos = static_cast<const pos_t*>(p.positions) + (s0 + t) * p.pos_stride_s;
      fVec coord[rope::kMaxAxes];
      for (int ax = 0; ax < p.axes; ++ax) {
        coord[ax] = fVec(static_cast<acc_t>(pos[ax * p.pos_stride_a]));
      }
      for (int64_t i = 0; i < half; i += W) {
        const int64_t n = std::min<int64_t>(W, half - i);
        rope::angle_sum(coord, p.axes, [&](int ax) { return fVec::loadu(freqs + ax * half + i, n); })
            .store(c1 + t * half + i, n);
      }
    }
    const int64_t len = count * half;
    for (int64_t i = 0; i < len; i += W) {
      const int64_t n = std::min<int64_t>(W, len - i);
      const auto angle = fVec::loadu(c1 + i, n);
      const auto sin = p.inverse ? fVec(acc_t(0)) - angle.sin() : angle.sin();
      angle.cos().store(c1 + i, n);
      sin.store(s1 + i, n);
    }
    return;
  }
  acc_t* c2 = s1 + stride;
  acc_t* s2 = c2 + stride;
  for (int64_t t = 0; t < count; ++t) {
    const acc_t* cs = static_cast<const acc_t*>(p.cos) + (s0 + t) * p.cos_stride_s;
    const acc_t* sn = static_cast<const acc_t*>(p.sin) + (s0 + t) * p.sin_stride_s;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t j = t * half + i;
      rope::table_coeffs<acc_t>(cs[i], sn[i], cs[i + half], sn[i + half], p.inverse, c1[j], s1[j], c2[j], s2[j]);
    }
  }
}

// Puts the first block_extent values of each of the `tables` coefficient tables' `count` rows of half values
// (table k, row t at table + k * kTileTokens * half + t * half) into BlockIO<scalar_t>'s lane order, for
// rotate_row's block loop.
template <typename scalar_t, typename acc_t>
void permute_coeff_rows(acc_t* table, int tables, int64_t count, int64_t half, std::vector<acc_t>& scratch) {
  const int64_t extent = block_extent<scalar_t>(half);
  scratch.resize(extent);
  for (int k = 0; k < tables; ++k) {
    for (int64_t t = 0; t < count; ++t) {
      acc_t* row = table + k * kTileTokens * half + t * half;
      cpu::reorder_blocks<scalar_t>(row, extent, scratch.data(), /*to_block=*/true);
      std::copy(scratch.begin(), scratch.end(), row);
    }
  }
}

// Touches (for reading or writing) the cache lines of one row of len elements ahead of its use.
template <typename scalar_t, int kWrite>
inline void prefetch_row(const scalar_t* row, int64_t len) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < len * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
    __builtin_prefetch(bytes + b, kWrite, 3);
  }
}

template <typename scalar_t, typename pos_t>
void rope_impl(const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = p.half;
  const int64_t D = 2 * half;
  const bool table_source = p.source == AngleSource::Table;
  int64_t row_elems = 0;
  // Streaming stores pay off only where they fill whole cache lines before the write-combining buffers give them
  // up: what the walk writes in one go must be a whole number of lines. An [S, H, D] output is walked token by
  // token, each writing its run of all heads (from [H, S, D] inputs: by tiles, below). [H, S, D] outputs are
  // walked head-major within a tile: each (tensor, head) writes the tile's kTileTokens rows, one contiguous
  // stretch of its plane (16 rows of D = 72 are 72 whole lines in float32, where one row is 4.5), before the
  // next: walked token by token, each token would write a few lines into each of the 3 * H planes in turn,
  // 3 * H interleaved short streams for the memory to take. Streaming half lines is slower than plain stores.
  bool lines_once = true, lines_tiled = true;
  bool in_place = false;
  for (int t = 0; t < p.num_slots; ++t) {
    const rope::TensorSlot& slot = p.slots[t];
    row_elems += slot.heads * D;
    in_place = in_place || slot.in == slot.out;
    const int64_t run = slot.out_stride_h == D ? slot.heads * D : D;
    const int64_t bytes = run * static_cast<int64_t>(sizeof(scalar_t));
    lines_once = lines_once && bytes % 64 == 0;
    // Tiles start on a line only where each [S, D] plane of an [H, S, D] output does.
    const bool planes_aligned =
        slot.out_stride_h == D || (slot.out_stride_h * static_cast<int64_t>(sizeof(scalar_t))) % 64 == 0;
    lines_tiled = lines_tiled && slot.out_stride_s == run && (kTileTokens * bytes) % 64 == 0 && planes_aligned;
  }
  const bool hsd =
      std::all_of(p.slots, p.slots + p.num_slots, [D](const rope::TensorSlot& slot) { return slot.out_stride_s == D; });
  // [H, S, D] inputs (the gradients rope_qkv_backward packs into [S, 3 * H * D]) are read the same way, head-major
  // within a tile, each (tensor, head) one stretch of its plane, instead of 3 * H interleaved short streams.
  // Where the output is streamed, their rows go to a tile-sized stage (in L2) from which each token's run of all
  // heads is then streamed out whole: written straight, a run would get one head's row at a time, in turn with
  // the tile's other tokens, partial lines that the write-combining buffers give up before they fill.
  const bool hsd_in = !hsd && std::all_of(p.slots, p.slots + p.num_slots, [D](const rope::TensorSlot& slot) {
    return slot.in_stride_s == D && slot.out_stride_h == D;
  });
  const int64_t step = hsd || hsd_in ? kTileTokens : 1;
  // Out of place, every element is read once and written once.
  const bool stream = !in_place && (lines_once || (hsd && lines_tiled)) &&
                      cpu::prefer_streaming_stores(2 * p.tokens * row_elems * static_cast<int64_t>(sizeof(scalar_t)));
  const bool staged = hsd_in && stream;
  int64_t slot_offset[rope::kMaxTensors] = {};  // of each tensor's run in a staged row
  for (int t = 1; t < p.num_slots; ++t) {
    slot_offset[t] = slot_offset[t - 1] + p.slots[t - 1].heads * D;
  }
  const int64_t tiles = (p.tokens + kTileTokens - 1) / kTileTokens;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_elems * kTileTokens, 1));

  // The models' head dims (64, 72, 80, 128) get walks with their pair count fixed at compile time, so every row
  // loop unrolls completely (no counters, no tail tests); others take the general walk (kHalf = 0).
  const auto walk = [&](auto shared, auto fixed_half) {
    constexpr bool kShared = decltype(shared)::value;
    constexpr int64_t kHalf = decltype(fixed_half)::value;
    const int64_t row_len = kHalf != 0 ? 2 * kHalf : D;
    at::parallel_for(0, tiles, grain, [&](int64_t tile_begin, int64_t tile_end) {
      const int tables = table_source ? 4 : 2;
      std::vector<acc_t> table(tables * kTileTokens * half);
      std::vector<acc_t> scratch;
      std::vector<scalar_t> stage_storage(staged ? kTileTokens * row_elems + 64 : 0);
      scalar_t* const stage = staged ? cpu::align_up(stage_storage.data(), 64) : nullptr;
      const int64_t stride = kTileTokens * half;
      const int64_t end = std::min(p.tokens, tile_end * kTileTokens);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t s0 = tile * kTileTokens;
        const int64_t count = std::min(kTileTokens, p.tokens - s0);
        tile_coeffs<acc_t, pos_t>(p, s0, count, table.data());
        if constexpr (kPermutedRows<scalar_t>) {
          permute_coeff_rows<scalar_t>(table.data(), tables, count, half, scratch);
        }
        for (int64_t s = s0; s < s0 + count; s += step) {
          const int64_t together = std::min(step, s0 + count - s);
          TokenCoeffs<acc_t> coeffs[kTileTokens];
          for (int64_t j = 0; j < together; ++j) {
            const acc_t* c1 = table.data() + (s + j - s0) * half;
            const acc_t* s1 = c1 + stride;
            coeffs[j] = {c1, s1, table_source ? s1 + stride : c1, table_source ? s1 + 2 * stride : s1};
          }
          for (int t = 0; t < p.num_slots; ++t) {
            // A copy: the row stores may alias any memory, so fields read through p would be reloaded after each.
            const rope::TensorSlot slot = p.slots[t];
            for (int64_t h = 0; h < slot.heads; ++h) {
              for (int64_t j = 0; j < together; ++j) {
                const int64_t token = s + j;
                const scalar_t* x = static_cast<const scalar_t*>(slot.in) + token * slot.in_stride_s +
                                    h * slot.in_stride_h;
                scalar_t* y = staged ? stage + j * row_elems + slot_offset[t] + h * D
                                     : static_cast<scalar_t*>(slot.out) + token * slot.out_stride_s +
                                           h * slot.out_stride_h;
                if (token + kPrefetchTokens < end) {
                  prefetch_row<scalar_t, 0>(x + kPrefetchTokens * slot.in_stride_s, row_len);
                  // Streaming stores write around the cache: fetching their lines first would undo that.
                  if (!stream) {
                    prefetch_row<scalar_t, 1>(y + kPrefetchTokens * slot.out_stride_s, row_len);
                  }
                }
                if (!slot.rotate) {
                  if (x != y) {
                    copy_row<2 * kHalf>(x, y, D, stream && !staged);
                  }
                  continue;
                }
                rotate_row<kShared, kHalf>(x, y, half, coeffs[j], stream && !staged);
              }
            }
          }
          if (staged) {
            for (int64_t j = 0; j < together; ++j) {
              for (int t = 0; t < p.num_slots; ++t) {
                const rope::TensorSlot& slot = p.slots[t];
                cpu::stream_copy(stage + j * row_elems + slot_offset[t],
                                 static_cast<scalar_t*>(slot.out) + (s + j) * slot.out_stride_s, slot.heads * D);
              }
            }
          }
        }
      }
      if (stream) {
        cpu::stream_fence();
      }
    });
  };
  const auto with_half = [&](auto shared) {
    switch (half) {
      case 32:
        return walk(shared, std::integral_constant<int64_t, 32>{});
      case 36:
        return walk(shared, std::integral_constant<int64_t, 36>{});
      case 40:
        return walk(shared, std::integral_constant<int64_t, 40>{});
      case 64:
        return walk(shared, std::integral_constant<int64_t, 64>{});
      default:
        return walk(shared, std::integral_constant<int64_t, 0>{});
    }
  };
  if (table_source) {
    with_half(std::false_type{});
  } else {
    with_half(std::true_type{});
  }
}

}  // namespace

void rope_cpu_kernel(const Params& p) {
  const auto dtype = static_cast<at::ScalarType>(p.dtype);
  const auto pos_dtype = p.source == AngleSource::Freqs ? static_cast<at::ScalarType>(p.pos_dtype) : at::kLong;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vlfuse.rope", [&] {
    using scalar = scalar_t;
    AT_DISPATCH_INDEX_TYPES(pos_dtype, "vlfuse.rope.positions", [&] { rope_impl<scalar, index_t>(p); });
  });
}

}  // namespace vlfuse::VLFUSE_ISA_NS
