// The Python extension module vlfuse._C. Importing it loads this library, whose static initializers register
// the operators (csrc/ops.cpp and the per-op implementation files); the module itself only reports how it
// was built.
#include <pybind11/pybind11.h>

#include "common/dispatch.h"
#include "common/cpu_memory.h"

#ifndef VLFUSE_CUDA_ARCHS
#define VLFUSE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["version"] = VLFUSE_VERSION;
#ifdef VLFUSE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(VLFUSE_CUDA_ARCHS);
  info["cpu_isas_built"] = std::string(VLFUSE_ISAS);
  info["cpu_isa"] = std::string(vlfuse::cpu_isa_name());
  // Built with the same flags as the CPU kernel objects (CMakeLists.txt): false means at::parallel_for runs
  // every CPU kernel on one thread.
#ifdef _OPENMP
  info["cpu_openmp"] = true;
#else
  info["cpu_openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  return info;
}

static py::dict output_cache_stats() {
  const vlfuse::cpu::OutputCacheStats s = vlfuse::cpu::output_cache_stats();
  py::dict stats;
  stats["limit_bytes"] = s.limit_bytes;
  stats["cached_bytes"] = s.cached_bytes;
  stats["cached_blocks"] = s.cached_blocks;
  stats["live_bytes"] = s.live_bytes;
  stats["reused"] = s.reused;
  stats["mapped"] = s.mapped;
  stats["released"] = s.released;
  return stats;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlfuse native kernels (operators are registered under torch.ops.vlfuse)";
  m.def("build_info", &build_info, "How the native library was built and which CPU kernels it runs");
  m.def("output_cache_stats", &output_cache_stats, "Counters of the CPU output block cache (csrc/common/cpu_memory.h)");
  m.def("empty_output_cache", &vlfuse::cpu::empty_output_cache, "Returns the kept CPU output blocks to the system");
  m.def("set_output_cache_limit", &vlfuse::cpu::set_output_cache_limit, py::arg("bytes"),
        "Sets how many bytes of freed CPU output blocks are kept for reuse (0: none)");
}
