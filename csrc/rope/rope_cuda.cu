// CUDA rotary kernel: one pass, one launch. A block row (threadIdx.y) owns one token: its lanes first compute
// the token's rotation coefficients once into shared memory, then sweep every head of every slot (q, k, and
// the copied grad_v of rope_qkv_backward) in 16-byte vectors, so a warp reads and writes contiguous runs of each
// head row.
// A half-width that 16-byte vectors do not divide but 8-byte ones do (Qwen3-VL's head_dim 72: 36 pairs, 4.5
// bf16 vectors of 8) takes 8-byte vectors: a warp's accesses still cover whole contiguous sectors.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "common/cuda_vec.cuh"
#include "rope/rope.h"

namespace vlfuse::rope {

namespace {

constexpr int kLanes = 64;
constexpr int kMaxTokensPerBlock = 4;
constexpr size_t kSharedLimit = 48 * 1024;

using cuda::load_pack;
using cuda::load_values;
using cuda::Pack;
using cuda::store_pack;

// A token's coefficients in shared memory, by chunks of the VEC pairs one lane rotates at a time: c1[VEC],
// s1[VEC], c2[VEC], s2[VEC], then kPad unused values, so the lane reads its chunk with 16-byte loads and lanes on
// different chunks start on different banks.
template <typename acc_t, int VEC>
struct CoeffLayout {
  static constexpr int kPad = VEC == 1 ? 0 : static_cast<int>(16 / sizeof(acc_t));
  static constexpr int kChunk = 4 * VEC + kPad;
  static constexpr int64_t bytes_per_token(int64_t half) {
    return half / VEC * kChunk * static_cast<int64_t>(sizeof(acc_t));
  }
  // Coefficient `which` (0: c1, 1: s1, 2: c2, 3: s2) of pair i.
  static __device__ int64_t index(int64_t i, int which) {
    return i / VEC * kChunk + which * VEC + i % VEC;
  }
};

template <typename acc_t>
__device__ inline void sin_cos(acc_t a, acc_t* s, acc_t* c);

template <>
__device__ inline void sin_cos<float>(float a, float* s, float* c) {
  sincosf(a, s, c);
}

template <>
__device__ inline void sin_cos<double>(double a, double* s, double* c) {
  sincos(a, s, c);
}

// At least 4 blocks per SM: at most 64 registers a thread, 32 warps per SM. The chunk's coefficients, loaded at
// once, would otherwise take the vector kernels to 72 registers and 24 warps.
template <typename scalar_t, typename pos_t, bool kTable, int VEC>
__global__ void __launch_bounds__(kLanes* kMaxTokensPerBlock, 4) rope_kernel(const Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Layout = CoeffLayout<acc_t, VEC>;
  using P = Pack<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t half = p.half;
  acc_t* coeffs = reinterpret_cast<acc_t*>(smem_raw + threadIdx.y * Layout::bytes_per_token(half));
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = s < p.tokens;

  if (active) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      acc_t c1, s1, c2, s2;
      if constexpr (kTable) {
        const acc_t* cs = static_cast<const acc_t*>(p.cos) + s * p.cos_stride_s;
        const acc_t* sn = static_cast<const acc_t*>(p.sin) + s * p.sin_stride_s;
        table_coeffs<acc_t>(cs[i], sn[i], cs[i + half], sn[i + half], p.inverse, c1, s1, c2, s2);
      } else {
        const pos_t* pos = static_cast<const pos_t*>(p.positions) + s * p.pos_stride_s;
        const acc_t a = angle<acc_t, pos_t>(pos, p.pos_stride_a, static_cast<const acc_t*>(p.freqs), half,
                                            p.axes, i);
        acc_t sn, cs;
        sin_cos<acc_t>(a, &sn, &cs);
        c1 = c2 = cs;
        s1 = s2 = p.inverse ? -sn : sn;
      }
      coeffs[Layout::index(i, 0)] = c1;
      coeffs[Layout::index(i, 1)] = s1;
      coeffs[Layout::index(i, 2)] = c2;
      coeffs[Layout::index(i, 3)] = s2;
    }
  }
  __syncthreads();
  if (!active) {
    return;
  }

  for (int t = 0; t < p.num_slots; ++t) {
    const TensorSlot& slot = p.slots[t];
    const scalar_t* in = static_cast<const scalar_t*>(slot.in) + s * slot.in_stride_s;
    scalar_t* out = static_cast<scalar_t*>(slot.out) + s * slot.out_stride_s;
    const int64_t chunks = (slot.rotate ? half : 2 * half) / VEC;
    const int64_t work = slot.heads * chunks;
    for (int64_t w = threadIdx.x; w < work; w += blockDim.x) {
      const int64_t h = w / chunks;
      const int64_t chunk = w - h * chunks;
      const int64_t i0 = chunk * VEC;
      const scalar_t* x = in + h * slot.in_stride_h;
      scalar_t* y = out + h * slot.out_stride_h;
      if (!slot.rotate) {
        store_pack(y + i0, load_pack<scalar_t, VEC>(x + i0));
        continue;
      }
      const P lo = load_pack<scalar_t, VEC>(x + i0);
      const P hi = load_pack<scalar_t, VEC>(x + half + i0);
      acc_t c[4 * VEC];
      load_values(coeffs + chunk * Layout::kChunk, c);
      P out_lo, out_hi;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t a, b;
        rotate_pair<acc_t>(static_cast<acc_t>(lo.v[j]), static_cast<acc_t>(hi.v[j]), c[j], c[VEC + j],
                           c[2 * VEC + j], c[3 * VEC + j], a, b);
        out_lo.v[j] = static_cast<scalar_t>(a);
        out_hi.v[j] = static_cast<scalar_t>(b);
      }
      store_pack(y + i0, out_lo);
      store_pack(y + half + i0, out_hi);
    }
  }
}

// Whether vectors of vec elements fit: every row start aligned to them, and the half-width a multiple of them.
template <typename scalar_t>
bool can_vectorize(const Params& p, int vec) {
  if (p.half % vec != 0) {
    return false;
  }
  const auto aligned = [&](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % (vec * sizeof(scalar_t)) == 0; };
  for (int t = 0; t < p.num_slots; ++t) {
    const TensorSlot& s = p.slots[t];
    if (!aligned(s.in) || !aligned(s.out) || s.in_stride_s % vec || s.in_stride_h % vec || s.out_stride_s % vec ||
        s.out_stride_h % vec) {
      return false;
    }
  }
  return true;
}

template <typename scalar_t, typename pos_t, bool kTable, int VEC>
void launch(const Params& p, cudaStream_t stream) {
  using Layout = CoeffLayout<at::opmath_type<scalar_t>, VEC>;
  auto kernel = rope_kernel<scalar_t, pos_t, kTable, VEC>;
  const int64_t per_token = Layout::bytes_per_token(p.half);
  int tokens_per_block = kMaxTokensPerBlock;
  while (tokens_per_block > 1 && tokens_per_block * per_token > static_cast<int64_t>(kSharedLimit)) {
    tokens_per_block /= 2;
  }
  const int64_t smem = tokens_per_block * per_token;
  if (smem > static_cast<int64_t>(kSharedLimit)) {
    // One token's coefficients take more than the default limit: opt in to what this GPU offers per block.
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device_index));
    TORCH_CHECK_VALUE(smem <= optin, "vlfuse.rope: head_dim ", 2 * p.half, " needs ", smem,
                      " bytes of shared memory per token in the CUDA kernel, more than the ", optin,
                      " this GPU offers per block (at most head_dim ", 2 * (optin / Layout::bytes_per_token(VEC)) * VEC,
                      " on CUDA; the CPU kernel has no such limit)");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t blocks = (p.tokens + tokens_per_block - 1) / tokens_per_block;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "vlfuse.rope: too many tokens for one launch: ",
                    p.tokens);
  kernel<<<static_cast<unsigned>(blocks), dim3(kLanes, tokens_per_block), static_cast<size_t>(smem), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename pos_t, bool kTable>
void launch_typed(const Params& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kHalfVec = kVec / 2;  // 8-byte vectors
  if (can_vectorize<scalar_t>(p, kVec)) {
    launch<scalar_t, pos_t, kTable, kVec>(p, stream);
    return;
  }
  if constexpr (kHalfVec > 1) {
    if (can_vectorize<scalar_t>(p, kHalfVec)) {
      launch<scalar_t, pos_t, kTable, kHalfVec>(p, stream);
      return;
    }
  }
  launch<scalar_t, pos_t, kTable, 1>(p, stream);
}

}  // namespace

void rope_cuda_kernel(const Params& p) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(p.device_index));
  const auto dtype = static_cast<at::ScalarType>(p.dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vlfuse.rope.cuda", [&] {
    using scalar = scalar_t;
    if (p.source == AngleSource::Table) {
      launch_typed<scalar, int64_t, true>(p, stream);
    } else {
      AT_DISPATCH_INDEX_TYPES(static_cast<at::ScalarType>(p.pos_dtype), "vlfuse.rope.cuda.positions",
                              [&] { launch_typed<scalar, index_t, false>(p, stream); });
    }
  });
}

}  // namespace vlfuse::rope
