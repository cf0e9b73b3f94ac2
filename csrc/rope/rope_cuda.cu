// CUDA rotary kernel: one pass, one launch. A block row (threadIdx.y) owns one token: its lanes first compute
// the token's rotation coefficients once into shared memory, then sweep every head of every slot (q, k, and
// the copied v of rope_qkv) in 16-byte vectors, so a warp reads and writes contiguous runs of each head row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_vec.cuh"
#include "rope/rope.h"

namespace vlfuse::rope {

namespace {

constexpr int kLanes = 64;
constexpr int kMaxTokensPerBlock = 4;
constexpr size_t kSharedLimit = 48 * 1024;

using cuda::Pack;

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

template <typename scalar_t, typename pos_t, bool kTable, int VEC>
__global__ void __launch_bounds__(kLanes* kMaxTokensPerBlock) rope_kernel(const Params p) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  extern __shared__ unsigned char smem_raw[];
  const int64_t half = p.half;
  acc_t* c1 = reinterpret_cast<acc_t*>(smem_raw) + threadIdx.y * 4 * half;
  acc_t* s1 = c1 + half;
  acc_t* c2 = s1 + half;
  acc_t* s2 = c2 + half;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = s < p.tokens;

  if (active) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      if constexpr (kTable) {
        const acc_t* cs = static_cast<const acc_t*>(p.cos) + s * p.cos_stride_s;
        const acc_t* sn = static_cast<const acc_t*>(p.sin) + s * p.sin_stride_s;
        table_coeffs<acc_t>(cs[i], sn[i], cs[i + half], sn[i + half], p.inverse, c1[i], s1[i], c2[i], s2[i]);
      } else {
        const pos_t* pos = static_cast<const pos_t*>(p.positions) + s * p.pos_stride_s;
        const acc_t a = angle<acc_t, pos_t>(pos, p.pos_stride_a, static_cast<const acc_t*>(p.freqs), half,
                                            p.axes, i);
        acc_t sn, cs;
        sin_cos<acc_t>(a, &sn, &cs);
        c1[i] = cs;
        c2[i] = cs;
        s1[i] = p.inverse ? -sn : sn;
        s2[i] = s1[i];
      }
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
      const int64_t i0 = (w - h * chunks) * VEC;
      const scalar_t* x = in + h * slot.in_stride_h;
      scalar_t* y = out + h * slot.out_stride_h;
      if (!slot.rotate) {
        *reinterpret_cast<P*>(y + i0) = *reinterpret_cast<const P*>(x + i0);
        continue;
      }
      const P lo = *reinterpret_cast<const P*>(x + i0);
      const P hi = *reinterpret_cast<const P*>(x + half + i0);
      P out_lo, out_hi;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t i = i0 + j;
        acc_t a, b;
        rotate_pair<acc_t>(static_cast<acc_t>(lo.v[j]), static_cast<acc_t>(hi.v[j]), c1[i], s1[i], c2[i], s2[i], a,
                           b);
        out_lo.v[j] = static_cast<scalar_t>(a);
        out_hi.v[j] = static_cast<scalar_t>(b);
      }
      *reinterpret_cast<P*>(y + i0) = out_lo;
      *reinterpret_cast<P*>(y + half + i0) = out_hi;
    }
  }
}

// 16-byte vectors when every row start and the half-width allow it, else scalar accesses.
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

template <typename scalar_t, typename pos_t, bool kTable>
void launch_typed(const Params& p, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  int tokens_per_block = kMaxTokensPerBlock;
  while (tokens_per_block > 1 && tokens_per_block * 4 * p.half * sizeof(acc_t) > kSharedLimit) {
    tokens_per_block /= 2;
  }
  const size_t smem = tokens_per_block * 4 * p.half * sizeof(acc_t);
  TORCH_CHECK_VALUE(smem <= kSharedLimit, "vlfuse.rope: head_dim ", 2 * p.half,
                    " is too large for the CUDA kernel (at most ", kSharedLimit / (2 * sizeof(acc_t)), ")");
  const dim3 block(kLanes, tokens_per_block);
  const dim3 grid(static_cast<unsigned>((p.tokens + tokens_per_block - 1) / tokens_per_block));
  TORCH_CHECK_VALUE(grid.x > 0 && static_cast<int64_t>(grid.x) * tokens_per_block >= p.tokens,
                    "vlfuse.rope: too many tokens for one launch: ", p.tokens);
  if (can_vectorize<scalar_t>(p, kVec)) {
    rope_kernel<scalar_t, pos_t, kTable, kVec><<<grid, block, smem, stream>>>(p);
  } else {
    rope_kernel<scalar_t, pos_t, kTable, 1><<<grid, block, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
