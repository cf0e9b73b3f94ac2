// Temporal patchify ops: argument checks (the only ones; the Python wrappers add none), output allocation, the
// hand-off of patchify::Params blocks to the CPU or CUDA packing kernel, and the patch-embedding GEMM (on the CPU,
// with the Conv3d's temporal taps folded into one for rows whose frames are equal).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_memory.h"
#include "common/dispatch.h"
#include "patchify/patchify.h"

VLFUSE_DECLARE_CPU_KERNEL(patchify_cpu_kernel, const ::vlfuse::patchify::Params&)
VLFUSE_DECLARE_CPU_KERNEL(equal_frames_cpu_kernel, const ::vlfuse::patchify::EqualFramesParams&)
VLFUSE_DECLARE_CPU_KERNEL(folded_weight_cpu_kernel, const ::vlfuse::patchify::FoldedWeightParams&)

namespace vlfuse::patchify {

#ifdef VLFUSE_WITH_CUDA
void patchify_cuda_kernel(const Params& p);
#endif

namespace {

using at::Tensor;

void launch(const Params& p, const Tensor& like) {
  if (p.patches > 0) {
    run_kernel("patchify", like, VLFUSE_CPU_KERNEL(patchify_cpu_kernel), VLFUSE_CUDA_KERNEL(patchify_cuda_kernel), p);
  }
}

bool is_frame_dtype(at::ScalarType t) {
  return t == at::kByte || is_supported_float(t);
}

// Checks one height or width against the packing constraints and names the nearest valid size when it fails.
void check_extent(const char* op, int64_t item, const char* what, int64_t extent, int64_t factor) {
  const int64_t nearest = std::max<int64_t>(factor, (extent + factor / 2) / factor * factor);
  VLFUSE_CHECK_VALUE(extent > 0 && extent % factor == 0, op, "frames[", item, "] ", what, " ", extent,
                     " is not a positive multiple of patch_size * merge_size = ", factor, "; the nearest valid ",
                     what, " is ", nearest, " (resize first, e.g. to vlfuse.ops.smart_resize(height, width, factor=",
                     factor, "))");
}

Tensor patchify(at::TensorList frames, int64_t patch_size, int64_t temporal_patch_size, int64_t merge_size,
                at::ArrayRef<double> mean, at::ArrayRef<double> std, at::ScalarType out_dtype) {
  const char* op = "patchify";
  VLFUSE_CHECK_VALUE(!frames.empty(), op, "frames must hold at least one [T, C, H, W] tensor, got an empty list");
  VLFUSE_CHECK_VALUE(patch_size > 0, op, "patch_size must be positive, got ", patch_size);
  VLFUSE_CHECK_VALUE(temporal_patch_size > 0, op, "temporal_patch_size must be positive, got ",
                     temporal_patch_size);
  VLFUSE_CHECK_VALUE(merge_size > 0, op, "merge_size must be positive, got ", merge_size);
  VLFUSE_CHECK_TYPE(is_supported_float(out_dtype), op,
                    "out_dtype must be float32, float64, float16 or bfloat16, got ", out_dtype);
  const Tensor& first = frames[0];
  const int64_t factor = patch_size * merge_size;
  const int64_t items = static_cast<int64_t>(frames.size());
  for (int64_t i = 0; i < items; ++i) {
    const Tensor& f = frames[i];
    VLFUSE_CHECK_TYPE(is_frame_dtype(f.scalar_type()), op, "frames[", i,
                      "] must be uint8 or float32/float64/float16/bfloat16, got ", f.scalar_type());
    VLFUSE_CHECK_VALUE(f.dim() == 4, op, "frames[", i, "] must be 4-D [T, C, H, W] (an image is T = 1), got shape ",
                       f.sizes());
    VLFUSE_CHECK(f.device() == first.device(), op, "frames[", i, "] is on ", f.device(), " but frames[0] is on ",
                 first.device(), "; all frames must be on the same device");
    VLFUSE_CHECK_TYPE(f.scalar_type() == first.scalar_type(), op, "frames[", i, "] has dtype ", f.scalar_type(),
                      " but frames[0] has ", first.scalar_type(), "; all frames must share one dtype");
    VLFUSE_CHECK_VALUE(f.size(1) == first.size(1), op, "frames[", i, "] has ", f.size(1),
                       " channels but frames[0] has ", first.size(1));
    VLFUSE_CHECK_VALUE(f.size(0) > 0, op, "frames[", i, "] must have at least one frame, got shape ", f.sizes());
    check_extent(op, i, "height", f.size(2), factor);
    check_extent(op, i, "width", f.size(3), factor);
  }
  const int64_t channels = first.size(1);
  VLFUSE_CHECK_VALUE(channels >= 1 && channels <= kMaxChannels, op, "frames must have 1 to ", kMaxChannels,
                     " channels, got ", channels);
  VLFUSE_CHECK_VALUE(static_cast<int64_t>(mean.size()) == channels, op, "mean must have one value per channel (",
                     channels, "), got ", mean.size());
  VLFUSE_CHECK_VALUE(static_cast<int64_t>(std.size()) == channels, op, "std must have one value per channel (",
                     channels, "), got ", std.size());

  Params p;
  p.channels = channels;
  p.patch = patch_size;
  p.temporal = temporal_patch_size;
  p.merge = merge_size;
  p.in_dtype = static_cast<int8_t>(first.scalar_type());
  p.out_dtype = static_cast<int8_t>(out_dtype);
  p.device_index = first.is_cuda() ? first.device().index() : -1;
  // uint8 pixels are rescaled to [0, 1] first; float frames are taken as already in [0, 1].
  const double rescale = first.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  for (int64_t c = 0; c < channels; ++c) {
    VLFUSE_CHECK_VALUE(std[c] != 0.0 && std::isfinite(std[c]) && std::isfinite(mean[c]), op,
                       "mean and std must be finite and std non-zero, got mean ", mean, " and std ", std);
    p.scale[c] = rescale / std[c];
    p.shift[c] = -mean[c] / std[c];
  }

  std::vector<int64_t> counts(frames.size());
  int64_t total = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    const Tensor& f = frames[i];
    const int64_t pairs = (f.size(0) + temporal_patch_size - 1) / temporal_patch_size;
    counts[i] = pairs * (f.size(2) / patch_size) * (f.size(3) / patch_size);
    total += counts[i];
  }
  const int64_t patch_elems = p.patch_elems();
  Tensor out = at::empty({total, patch_elems}, first.options().dtype(out_dtype));
  auto* out_base = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = patch_elems * static_cast<int64_t>(out.element_size());

  int64_t done = 0;
  for (size_t begin = 0; begin < frames.size(); begin += kMaxItems) {
    const size_t end = std::min(frames.size(), begin + kMaxItems);
    p.num_items = static_cast<int>(end - begin);
    p.out = out_base + done * row_bytes;
    p.patches = 0;
    for (size_t i = begin; i < end; ++i) {
      const Tensor& f = frames[i];
      Item& it = p.items[i - begin];
      it.frames = f.data_ptr();
      it.stride_t = f.stride(0);
      it.stride_c = f.stride(1);
      it.stride_h = f.stride(2);
      it.stride_w = f.stride(3);
      it.num_frames = f.size(0);
      it.grid_h = f.size(2) / patch_size;
      it.grid_w = f.size(3) / patch_size;
      it.first_patch = p.patches;
      it.patches = counts[i];
      p.patches += counts[i];
    }
    launch(p, first);
    done += p.patches;
  }
  return out;
}

// weight [E, C, Tp, P, P] (any float layout) as the [E, K] GEMM operand.
Tensor flat_weight(const char* op, const Tensor& weight, const Tensor& patches) {
  check_float_tensor(weight, op, "weight");
  VLFUSE_CHECK_VALUE(weight.dim() >= 2, op, "weight must be the Conv3d weight [E, C, Tp, P, P] (or [E, K]), got shape ",
                     weight.sizes());
  check_same_device(weight, "weight", patches, "patches", op);
  const int64_t embed = weight.size(0);
  const int64_t k = embed == 0 ? 0 : weight.numel() / embed;
  VLFUSE_CHECK_VALUE(k == patches.size(1), op, "patches has ", patches.size(1),
                     " values per patch but weight ", weight.sizes(), " takes C * Tp * P * P = ", k);
  return weight.reshape({embed, k});
}

// The type the GEMM runs in: on a CPU without a native GEMM for a reduced type, the same rounded inputs go
// through float32 sgemm and are rounded once at the end.
at::ScalarType gemm_type(const Tensor& x) {
  return x.is_cpu() && !cpu::gemm_is_native(x.scalar_type()) ? at::kFloat : x.scalar_type();
}

// out = x . w^T (+ b), into out's rows; w already in gemm_type(x) (converted once per call, not per run).
void gemm_rows(Tensor out, const Tensor& x, const Tensor& w, const Tensor& b) {
  if (w.scalar_type() != x.scalar_type()) {
    const Tensor x32 = x.to(w.scalar_type());
    out.copy_(b.defined() ? at::addmm(b.to(w.scalar_type()), x32, w.t()) : at::mm(x32, w.t()));
  } else if (b.defined()) {
    at::addmm_out(out, b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

// Rows [begin, end) of patch_embed's input that share one GEMM; folded: their Tp frames are equal.
struct RowRun {
  int64_t begin, end;
  bool folded;
};

// Fewer equal rows than this in a row are left in the full GEMM: a small extra GEMM call costs more than it saves.
constexpr int64_t kMinFoldedRows = 32;

// Splits rows into runs of equal-frame rows (at least kMinFoldedRows long) and runs of the others.
std::vector<RowRun> row_runs(const uint8_t* equal, int64_t count) {
  std::vector<RowRun> runs;
  for (int64_t begin = 0; begin < count;) {
    int64_t end = begin + 1;
    while (end < count && equal[end] == equal[begin]) {
      ++end;
    }
    const bool folded = equal[begin] != 0 && end - begin >= kMinFoldedRows;
    if (!runs.empty() && !runs.back().folded && !folded) {
      runs.back().end = end;
    } else {
      runs.push_back({begin, end, folded});
    }
    begin = end;
  }
  return runs;
}

// The [E, C * P * P] weight of rows with equal frames: the Conv3d weight [E, C, Tp, P, P] summed over Tp; undefined
// where a sum is not finite in the weight's type.
Tensor folded_weight(const Tensor& weight) {
  const Tensor w = weight.contiguous();
  Tensor out = cpu::empty_output({w.size(0), w.size(1) * w.size(3) * w.size(4)}, w.options());
  FoldedWeightParams p;
  p.weight = w.data_ptr();
  p.out = out.data_ptr();
  p.rows = w.size(0) * w.size(1);
  p.temporal = w.size(2);
  p.plane = w.size(3) * w.size(4);
  p.dtype = static_cast<int8_t>(w.scalar_type());
  bool not_finite = false;
  p.not_finite = &not_finite;
  VLFUSE_CPU_KERNEL(folded_weight_cpu_kernel)(p);
  return not_finite ? Tensor() : out;
}

Tensor patch_embed(const Tensor& patches, const Tensor& weight, const c10::optional<Tensor>& bias) {
  const char* op = "patch_embed";
  check_float_tensor(patches, op, "patches");
  check_dim(patches, 2, op, "patches", "[N, C * Tp * P * P]");
  const auto dtype = weight.scalar_type();
  const Tensor w = flat_weight(op, weight, patches);
  const Tensor x = patches.to(dtype);
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_same_device(b, "bias", patches, "patches", op);
    VLFUSE_CHECK_TYPE(b.scalar_type() == dtype, op, "bias has dtype ", b.scalar_type(), " but weight has ", dtype);
    VLFUSE_CHECK_VALUE((b.dim() == 1 && b.size(0) == w.size(0)) ||
                           (b.dim() == 2 && b.size(0) == patches.size(0) && b.size(1) == w.size(0)),
                       op, "bias must be [E] = [", w.size(0), "] or one row per patch [N, E] = [", patches.size(0),
                       ", ", w.size(0), "], got shape ", b.sizes());
  }
  const int64_t rows = x.size(0), embed = w.size(0);
  const auto gemm_dtype = gemm_type(x);
  Tensor out = cpu::empty_output({rows, embed}, x.options());
  // Equal frames are looked for on the CPU only: on CUDA, choosing the GEMMs from the data would need a
  // device-to-host read, which breaks stream order and CUDA graphs.
  const bool may_fold = x.is_cpu() && weight.dim() == 5 && weight.size(2) > 1 && rows >= kMinFoldedRows &&
                        x.stride(1) == 1 && embed > 0;
  if (!may_fold) {
    gemm_rows(out, x, w.to(gemm_dtype), b);
    return out;
  }
  EqualFramesParams p;
  p.rows = x.data_ptr();
  p.row_stride = x.stride(0);
  p.count = rows;
  p.channels = weight.size(1);
  p.temporal = weight.size(2);
  p.plane = weight.size(3) * weight.size(4);
  p.elem_size = static_cast<int64_t>(x.element_size());
  // Rows found unequal are left unwritten, and never read.
  Tensor first_frames = cpu::empty_output({rows, p.channels * p.plane}, x.options());
  std::vector<uint8_t> equal(rows);
  p.first_frames = first_frames.data_ptr();
  p.equal = equal.data();
  VLFUSE_CPU_KERNEL(equal_frames_cpu_kernel)(p);
  const std::vector<RowRun> runs = row_runs(equal.data(), rows);
  const bool any_folded = std::any_of(runs.begin(), runs.end(), [](const RowRun& r) { return r.folded; });
  const Tensor folded = any_folded ? folded_weight(weight) : Tensor();
  const Tensor w_gemm = w.to(gemm_dtype);
  if (!folded.defined()) {
    gemm_rows(out, x, w_gemm, b);
    return out;
  }
  const Tensor folded_w = folded.to(gemm_dtype);
  for (const RowRun& run : runs) {
    const int64_t n = run.end - run.begin;
    const Tensor b_rows = b.defined() && b.dim() == 2 ? b.narrow(0, run.begin, n) : b;
    if (run.folded) {
      gemm_rows(out.narrow(0, run.begin, n), first_frames.narrow(0, run.begin, n), folded_w, b_rows);
    } else {
      gemm_rows(out.narrow(0, run.begin, n), x.narrow(0, run.begin, n), w_gemm, b_rows);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfuse, CPU, m) {
  m.impl("patchify", &patchify);
  m.impl("patch_embed", &patch_embed);
}

#ifdef VLFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vlfuse, CUDA, m) {
  m.impl("patchify", &patchify);
  m.impl("patch_embed", &patch_embed);
}
#endif

}  // namespace vlfuse::patchify
