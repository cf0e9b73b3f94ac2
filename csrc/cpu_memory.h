// Page-level hints for the large outputs that CPU kernels write for the first time.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vlfuse::cpu {

// Asks Linux to back the whole 2 MiB pages of a fresh CPU tensor of at least 32 MiB with transparent huge pages
// (THP), before a kernel writes it. glibc gives every block that large a new mapping of its own (32 MiB is
// the most its mmap threshold adapts to), so its first write takes a page fault and a zeroed 4 KiB page every
// 4 KiB: on the project's machines ~1.2 ms per MB, more than the kernel that writes it (an 84 MB merge2x2
// output: ~50 ms of faults against ~20 ms of work). With huge pages that is one fault per 2 MiB. Smaller
// blocks come from glibc's heap, mostly already mapped, and are left alone (marking heap ranges measured no
// better). A hint only: results do not depend on it, nothing changes where THP is off, and errors are ignored.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  constexpr size_t kMinBytes = size_t(32) << 20;
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (!t.is_cpu() || nbytes < kMinBytes) {
    return;
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

// at::empty for an output a kernel is about to write in full, with the huge-page hint above.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

}  // namespace vlfuse::cpu
