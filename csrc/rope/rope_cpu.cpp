// CPU rotary kernel. Compiled once per ISA (see CMakeLists.txt); one pass over memory, parallel over tokens:
// each token's coefficients are computed once into a small per-thread table and reused by every head of q and k.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "cpu_vec.h"
#include "rope/rope.h"

namespace vlfuse::VLFUSE_ISA_NS {

using at::vec::Vectorized;
using rope::AngleSource;
using rope::Params;

namespace {

template <typename scalar_t, typename pos_t>
void rope_impl(const Params& p) {
  using IO = cpu::VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using fVec = typename IO::fVec;
  constexpr int kParts = IO::kAccPerBlock;
  const int64_t half = p.half;
  const int64_t D = 2 * half;
  int64_t row_elems = 0;
  for (int t = 0; t < p.num_slots; ++t) {
    row_elems += p.slots[t].heads * D;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1));

  at::parallel_for(0, p.tokens, grain, [&](int64_t begin, int64_t end) {
    // c1, s1, c2, s2 for every pair of the current token.
    std::vector<acc_t> coef(4 * half);
    acc_t* c1 = coef.data();
    acc_t* s1 = c1 + half;
    acc_t* c2 = s1 + half;
    acc_t* s2 = c2 + half;
    const bool same_cs = p.source == AngleSource::Freqs;
    for (int64_t s = begin; s < end; ++s) {
      if (p.source == AngleSource::Freqs) {
        const pos_t* pos = static_cast<const pos_t*>(p.positions) + s * p.pos_stride_s;
        const acc_t* freqs = static_cast<const acc_t*>(p.freqs);
        for (int64_t i = 0; i < half; ++i) {
          c1[i] = rope::angle<acc_t, pos_t>(pos, p.pos_stride_a, freqs, half, p.axes, i);
        }
        constexpr int64_t W = Vectorized<acc_t>::size();
        for (int64_t i = 0; i < half; i += W) {
          const int64_t n = std::min<int64_t>(W, half - i);
          const auto a = Vectorized<acc_t>::loadu(c1 + i, n);
          const auto sn = p.inverse ? acc_t(0) - a.sin() : a.sin();
          a.cos().store(c1 + i, n);
          sn.store(s1 + i, n);
        }
      } else {
        const acc_t* cs = static_cast<const acc_t*>(p.cos) + s * p.cos_stride_s;
        const acc_t* sn = static_cast<const acc_t*>(p.sin) + s * p.sin_stride_s;
        for (int64_t i = 0; i < half; ++i) {
          rope::table_coeffs<acc_t>(cs[i], sn[i], cs[i + half], sn[i + half], p.inverse, c1[i], s1[i], c2[i],
                                    s2[i]);
        }
      }
      const acc_t* cc2 = same_cs ? c1 : c2;
      const acc_t* ss2 = same_cs ? s1 : s2;

      for (int t = 0; t < p.num_slots; ++t) {
        const rope::TensorSlot& slot = p.slots[t];
        const scalar_t* in = static_cast<const scalar_t*>(slot.in) + s * slot.in_stride_s;
        scalar_t* out = static_cast<scalar_t*>(slot.out) + s * slot.out_stride_s;
        for (int64_t h = 0; h < slot.heads; ++h) {
          const scalar_t* x = in + h * slot.in_stride_h;
          scalar_t* y = out + h * slot.out_stride_h;
          if (!slot.rotate) {
            if (x != y) {
              std::memcpy(y, x, D * sizeof(scalar_t));
            }
            continue;
          }
          for (int64_t i = 0; i < half; i += IO::kBlock) {
            const int64_t n = std::min<int64_t>(IO::kBlock, half - i);
            fVec lo[kParts], hi[kParts], a[kParts], b[kParts], cv1[kParts], sv1[kParts], cv2[kParts],
                sv2[kParts];
            IO::load(x + i, n, lo);
            IO::load(x + half + i, n, hi);
            cpu::load_acc<acc_t, kParts>(c1 + i, n, cv1);
            cpu::load_acc<acc_t, kParts>(s1 + i, n, sv1);
            cpu::load_acc<acc_t, kParts>(cc2 + i, n, cv2);
            cpu::load_acc<acc_t, kParts>(ss2 + i, n, sv2);
            for (int j = 0; j < kParts; ++j) {
              rope::rotate_pair<fVec>(lo[j], hi[j], cv1[j], sv1[j], cv2[j], sv2[j], a[j], b[j]);
            }
            IO::store(y + i, n, a);
            IO::store(y + half + i, n, b);
          }
        }
      }
    }
  });
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
