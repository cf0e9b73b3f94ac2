// Vector access shared by the CUDA kernels: N elements moved as one aligned load or store (16 bytes at most).
#pragma once

namespace vlfuse::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace vlfuse::cuda
