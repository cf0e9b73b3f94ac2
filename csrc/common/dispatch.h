// The hand-off from an op front to its kernels: the CPU kernel built for the best instruction set the running
// CPU supports (each *_cpu.cpp is compiled once per ISA, see CMakeLists.txt), or the CUDA kernel.
#pragma once

#include <ATen/ATen.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "common/checks.h"

namespace vlfuse {

// Which copy of the CPU kernels runs: the best one this CPU supports, capped by ATEN_CPU_CAPABILITY
// (default / avx2 / avx512) so that one variable steers vlfuse exactly as it steers PyTorch. AVX512_BF16 (AVX512
// plus the native bfloat16 conversions) runs only where no cap is set: "avx512" means AVX-512F/BW/VL/DQ alone,
// as it does for ATen.
enum class CpuIsa { DEFAULT = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

inline CpuIsa detect_cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  CpuIsa best = CpuIsa::DEFAULT;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = CpuIsa::AVX2;
  }
  if (best == CpuIsa::AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = CpuIsa::AVX512;
  }
#if defined(VLFUSE_WITH_AVX512_BF16)
  if (best == CpuIsa::AVX512 && __builtin_cpu_supports("avx512bf16")) {
    best = CpuIsa::AVX512_BF16;
  }
#endif
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    std::string cap(env);
    for (auto& ch : cap) {
      ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    }
    if (cap == "default") {
      best = CpuIsa::DEFAULT;
    } else if (cap == "avx2" && best >= CpuIsa::AVX2) {
      best = CpuIsa::AVX2;
    } else if (cap == "avx512" && best >= CpuIsa::AVX512) {
      best = CpuIsa::AVX512;
    }
  }
  return best;
#else
  return CpuIsa::DEFAULT;
#endif
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::AVX512_BF16:
      return "AVX512_BF16";
    case CpuIsa::AVX512:
      return "AVX512";
    case CpuIsa::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

// The one hand-off from an op front to its kernels: the CPU kernel built for this CPU's ISA, or the CUDA kernel
// (nullptr in a CPU-only build, see VLFUSE_CUDA_KERNEL), by the device of `like`.
template <typename P>
void run_kernel(const char* op, const at::Tensor& like, void (*cpu_kernel)(const P&),
                std::type_identity_t<void (*)(const P&)> cuda_kernel, const P& p) {
  if (like.is_cpu()) {
    cpu_kernel(p);
    return;
  }
  VLFUSE_CHECK(like.is_cuda() && cuda_kernel != nullptr, op, "no kernel for device ", like.device(),
               " in this build (vlfuse.build_info() lists what was built)");
  cuda_kernel(p);
}

}  // namespace vlfuse

#ifdef VLFUSE_WITH_CUDA
#define VLFUSE_CUDA_KERNEL(NAME) (&NAME)
#else
#define VLFUSE_CUDA_KERNEL(NAME) (nullptr)
#endif

// Declares a CPU kernel that each *_cpu.cpp defines inside `namespace vlfuse::VLFUSE_ISA_NS`, once per ISA.
#if defined(__x86_64__) || defined(_M_X64)
#define VLFUSE_DECLARE_CPU_KERNEL(NAME, PARAMS)     \
  namespace vlfuse {                                \
  namespace cpu_DEFAULT { void NAME(PARAMS); }      \
  namespace cpu_AVX2 { void NAME(PARAMS); }         \
  namespace cpu_AVX512 { void NAME(PARAMS); }       \
  namespace cpu_AVX512_BF16 { void NAME(PARAMS); }  \
  }
#if defined(VLFUSE_WITH_AVX512_BF16)
#define VLFUSE_CPU_KERNEL_AVX512_BF16(NAME, OTHERWISE) \
  (::vlfuse::cpu_isa() == ::vlfuse::CpuIsa::AVX512_BF16 ? &::vlfuse::cpu_AVX512_BF16::NAME : (OTHERWISE))
#else
#define VLFUSE_CPU_KERNEL_AVX512_BF16(NAME, OTHERWISE) (OTHERWISE)
#endif
#define VLFUSE_CPU_KERNEL(NAME)                                                                  \
  VLFUSE_CPU_KERNEL_AVX512_BF16(NAME, (::vlfuse::cpu_isa() == ::vlfuse::CpuIsa::AVX512 ? &::vlfuse::cpu_AVX512::NAME \
                                       : ::vlfuse::cpu_isa() == ::vlfuse::CpuIsa::AVX2 ? &::vlfuse::cpu_AVX2::NAME   \
                                                                                       : &::vlfuse::cpu_DEFAULT::NAME))
#else
#define VLFUSE_DECLARE_CPU_KERNEL(NAME, PARAMS) \
  namespace vlfuse {                            \
  namespace cpu_DEFAULT { void NAME(PARAMS); }  \
  }
#define VLFUSE_CPU_KERNEL(NAME) (&::vlfuse::cpu_DEFAULT::NAME)
#endif
