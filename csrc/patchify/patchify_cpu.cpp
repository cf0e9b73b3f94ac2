// CPU packing kernel. Compiled once per ISA (see CMakeLists.txt); parallel over patches, one pass over the
// frames: every patch row of P pixels is loaded, converted and normalized with vector instructions, and each
// finished patch is converted to the output dtype in one contiguous vector pass. Below it, patch_embed's two
// helpers for rows of equal frames: the look at its input rows, and the weight summed over its temporal taps.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "patchify/patchify.h"

namespace vlfuse::VLFUSE_ISA_NS {

using at::vec::Vectorized;
using patchify::Params;

namespace {

// Loads n <= Vectorized<acc_t>::size() consecutive pixels as acc_t lanes. whole: a full Vectorized<in_t> may be
// read from p (it stays inside the frame row), so the load needs no mask; lanes past n are then unspecified.
template <typename acc_t, typename in_t>
inline Vectorized<acc_t> load_pixels(const in_t* p, int64_t n, bool whole) {
  using aVec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<in_t, acc_t>) {
    return whole ? aVec::loadu(p) : aVec::loadu(p, n);
  } else if constexpr (std::is_same_v<acc_t, float> && at::vec::is_reduced_floating_point_v<in_t>) {
    const auto v = whole ? Vectorized<in_t>::loadu(p) : Vectorized<in_t>::loadu(p, n);
    return std::get<0>(at::vec::convert_to_float<in_t>(v));
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<in_t, uint8_t>) {
    const auto v = whole ? Vectorized<uint8_t>::loadu(p) : Vectorized<uint8_t>::loadu(p, static_cast<uint8_t>(n));
    return at::vec::convert<float>(v);
  } else {
    __at_align__ acc_t buf[aVec::size()] = {};
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = static_cast<acc_t>(p[i]);
    }
    return aVec::loadu(buf);
  }
}

template <typename in_t, typename out_t>
void patchify_impl(const Params& p) {
  using acc_t = at::opmath_type<out_t>;
  using aVec = Vectorized<acc_t>;
  constexpr int64_t W = aVec::size();
  constexpr int64_t kInVec = Vectorized<in_t>::size();
  const int64_t P = p.patch, Tp = p.temporal, C = p.channels;
  const int64_t patch_elems = p.patch_elems();
  const int64_t grain = std::max<int64_t>(1, 32768 / patch_elems);
  out_t* out = static_cast<out_t*>(p.out);

  at::parallel_for(0, p.patches, grain, [&](int64_t begin, int64_t end) {
    // One patch in acc_t, written row by row with whole vectors (W lanes of slack at the end), then converted
    // to out_t in one contiguous pass: no masked stores of 16-bit types, which at::vec does through memcpy.
    std::vector<acc_t> patch_buf(patch_elems + W);
    int item = patchify::item_of(p, begin, 0);
    for (int64_t n = begin; n < end; ++n) {
      item = patchify::item_of(p, n, item);
      const patchify::Item& it = p.items[item];
      const auto pos = patchify::patch_position(n - it.first_patch, it.grid_h, it.grid_w, p.merge);
      const in_t* origin = static_cast<const in_t*>(it.frames) + pos.ph * P * it.stride_h + pos.pw * P * it.stride_w;
      const int64_t row_left = (it.grid_w - pos.pw) * P;  // pixels from the patch's left edge to the frame's right
      acc_t* dst = patch_buf.data();
      for (int64_t c = 0; c < C; ++c) {
        const acc_t scale = static_cast<acc_t>(p.scale[c]);
        const acc_t shift = static_cast<acc_t>(p.shift[c]);
        const aVec scale_v(scale), shift_v(shift);
        for (int64_t tp = 0; tp < Tp; ++tp) {
          const int64_t f = patchify::source_frame(pos.t, tp, Tp, it.num_frames);
          const in_t* plane = origin + f * it.stride_t + c * it.stride_c;
          for (int64_t py = 0; py < P; ++py, dst += P) {
            const in_t* row = plane + py * it.stride_h;
            if (it.stride_w == 1) {
              for (int64_t x = 0; x < P; x += W) {
                const int64_t len = std::min<int64_t>(W, P - x);
                const aVec v = load_pixels<acc_t>(row + x, len, row_left - x >= kInVec);
                patchify::normalize<aVec>(v, scale_v, shift_v).store(dst + x);
              }
            } else {
              for (int64_t x = 0; x < P; ++x) {
                const acc_t v = static_cast<acc_t>(row[x * it.stride_w]);
                dst[x] = patchify::normalize<acc_t>(v, scale, shift);
              }
            }
          }
        }
      }
      at::vec::convert(patch_buf.data(), out + n * patch_elems, patch_elems);
    }
  });
}

}  // namespace

void patchify_cpu_kernel(const Params& p) {
  const auto in_dtype = static_cast<at::ScalarType>(p.in_dtype);
  const auto out_dtype = static_cast<at::ScalarType>(p.out_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, in_dtype, "vlfuse.patchify", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "vlfuse.patchify.out",
                                    [&] { patchify_impl<in_t, scalar_t>(p); });
  });
}

void equal_frames_cpu_kernel(const patchify::EqualFramesParams& p) {
  const int64_t plane_bytes = p.plane * p.elem_size;
  const int64_t row_bytes = p.row_stride * p.elem_size;
  const int64_t first_bytes = p.channels * plane_bytes;
  const auto* rows = static_cast<const char*>(p.rows);
  auto* first = static_cast<char*>(p.first_frames);
  // A row of distinct frames usually differs in its first bytes, so memcmp returns at once: the look costs a full
  // read only of the rows that then save half their GEMM.
  at::parallel_for(0, p.count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const char* row = rows + n * row_bytes;
      bool equal = true;
      for (int64_t c = 0; c < p.channels && equal; ++c) {
        const char* frame0 = row + c * p.temporal * plane_bytes;
        for (int64_t t = 1; t < p.temporal && equal; ++t) {
          equal = std::memcmp(frame0, frame0 + t * plane_bytes, plane_bytes) == 0;
        }
      }
      p.equal[n] = equal ? 1 : 0;
      if (equal) {
        for (int64_t c = 0; c < p.channels; ++c) {
          std::memcpy(first + n * first_bytes + c * plane_bytes, row + c * p.temporal * plane_bytes, plane_bytes);
        }
      }
    }
  });
}

namespace {

// Whether |v[i]| <= bound for all i < n; false where any v[i] is NaN.
template <typename T>
bool all_within(const T* v, int64_t n, T bound) {
  using Vec = Vectorized<T>;
  const Vec bound_v(bound);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    if ((Vec::loadu(v + i).abs() <= bound_v).zero_mask() != 0) {
      return false;
    }
  }
  for (; i < n; ++i) {
    if (!(std::abs(v[i]) <= bound)) {
      return false;
    }
  }
  return true;
}

}  // namespace

void folded_weight_cpu_kernel(const patchify::FoldedWeightParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.dtype),
                                  "vlfuse.patch_embed.folded_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* weight = static_cast<const scalar_t*>(p.weight);
    auto* out = static_cast<scalar_t*>(p.out);
    // A sum rounds to a finite value where its magnitude is at most the type's largest (NaN fails the test too).
    const acc_t largest = static_cast<acc_t>(std::numeric_limits<scalar_t>::max());
    at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(p.plane), tap(p.plane);
      bool finite = true;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* taps = weight + r * p.temporal * p.plane;
        at::vec::convert(taps, sum.data(), p.plane);
        for (int64_t t = 1; t < p.temporal; ++t) {
          at::vec::convert(taps + t * p.plane, tap.data(), p.plane);
          for (int64_t i = 0; i < p.plane; ++i) {
            sum[i] += tap[i];
          }
        }
        finite = finite && all_within(sum.data(), p.plane, largest);
        at::vec::convert(sum.data(), out + r * p.plane, p.plane);
      }
      if (!finite) {
        std::atomic_ref<bool>(*p.not_finite).store(true, std::memory_order_relaxed);
      }
    });
  });
}

}  // namespace vlfuse::VLFUSE_ISA_NS
