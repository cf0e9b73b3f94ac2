// CUDA epilogue of linear_act: one pass over the GEMM's [rows, cols] output. Each thread takes N consecutive
// elements of a row (a 16-byte pack of the output type when the row length and every pointer allow, else one),
// in a grid-stride loop over the block; the bias comes in the accumulation type. The GEMM itself is cuBLAS's
// (at::mm_out in the front; at::addmm_out with the bias for bf16/fp16, which then reaches this pass as null).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_vec.cuh"
#include "linear_act/linear_act.h"

namespace vlfuse::linear_act {

namespace {

constexpr int kThreads = 256;

// exp, tanh and erf in device code: the CUDA math library's, for float and double.
struct DeviceMath {
  template <typename T>
  __device__ static T exp(T x) {
    return ::exp(x);
  }
  template <typename T>
  __device__ static T tanh(T x) {
    return ::tanh(x);
  }
  template <typename T>
  __device__ static T erf(T x) {
    return ::erf(x);
  }
};

template <typename T, int N>
__device__ inline void load_acc(const T* p, at::opmath_type<T>* v) {
  if constexpr (N == 1) {
    v[0] = static_cast<at::opmath_type<T>>(*p);
  } else {
    const cuda::Pack<T, N> pk = cuda::load_pack<T, N>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      v[e] = static_cast<at::opmath_type<T>>(pk.v[e]);
    }
  }
}

template <typename T, int N, typename A>
__device__ inline void store_acc(T* p, const A* v) {
  if constexpr (N == 1) {
    *p = static_cast<T>(v[0]);
  } else {
    cuda::Pack<T, N> pk;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      pk.v[e] = static_cast<T>(v[e]);
    }
    cuda::store_pack<T, N>(p, pk);
  }
}

// N elements per thread of a block of rows * cols elements, cols a multiple of N.
template <Act ACT, typename out_t, int N>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(const Params p) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t packs = p.rows * p.cols / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < packs; i += stride) {
    const int64_t at = i * N;
    acc_t v[N];
    if (p.backward) {
      acc_t g[N];
      load_acc<out_t, N>(static_cast<const out_t*>(p.in) + at, v);
      load_acc<out_t, N>(static_cast<const out_t*>(p.grad) + at, g);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        v[e] = g[e] * act_derivative<ACT, DeviceMath>(v[e]);
      }
      store_acc<out_t, N>(static_cast<out_t*>(p.out) + at, v);
      continue;
    }
    load_acc<out_t, N>(static_cast<const out_t*>(p.in) + at, v);
    if (p.bias != nullptr) {
      const int64_t col = at % p.cols;
      const acc_t* bias = static_cast<const acc_t*>(p.bias) + col;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        v[e] += bias[e];
      }
    }
    if (p.preact != nullptr) {
      store_acc<out_t, N>(static_cast<out_t*>(p.preact) + at, v);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      v[e] = act_forward<ACT, DeviceMath>(v[e]);
    }
    store_acc<out_t, N>(static_cast<out_t*>(p.out) + at, v);
  }
}

bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <Act ACT, typename out_t>
void launch_typed(const Params& p) {
  constexpr int kPack = 16 / sizeof(out_t);
  // Packs need every row to hold whole packs and every block 16-byte aligned.
  const bool packed =
      p.cols % kPack == 0 && aligned16(p.in) && aligned16(p.out) && aligned16(p.preact) && aligned16(p.grad);
  const int64_t per = packed ? kPack : 1;
  const int64_t work = p.rows * p.cols / per;
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20);
  const auto stream = c10::cuda::getCurrentCUDAStream(p.device_index);
  if (packed) {
    epilogue_kernel<ACT, out_t, kPack><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    epilogue_kernel<ACT, out_t, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename out_t>
void launch_act(const Params& p) {
  switch (p.act) {
    case Act::QuickGelu:
      return launch_typed<Act::QuickGelu, out_t>(p);
    case Act::Gelu:
      return launch_typed<Act::Gelu, out_t>(p);
    case Act::GeluTanh:
      return launch_typed<Act::GeluTanh, out_t>(p);
    case Act::Silu:
      return launch_typed<Act::Silu, out_t>(p);
    case Act::None:
      return launch_typed<Act::None, out_t>(p);
  }
}

}  // namespace

void linear_act_cuda_kernel(const Params& p) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(p.device_index));
  // On the GPU the GEMM runs in the op's dtype: its output and the epilogue's share one type.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(p.out_dtype),
                                  "vlfuse.linear_act", [&] { launch_act<scalar_t>(p); });
}

}  // namespace vlfuse::linear_act
