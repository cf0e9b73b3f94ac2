// Memory for the large outputs that the CPU kernels write in full (rope's q/k/v and gradients, merge2x2's merged
// rows and input gradient), kept for reuse the way the CUDA caching allocator keeps device memory.
//
// Why: from glibc, a block of a few MB or more is often a fresh mapping (always from 32 MiB up; below that it
// depends on the process's history of frees, as glibc adapts its mmap and trim thresholds), and the first write
// to every 4 KiB page of a fresh mapping is a page fault that zeroes the page. The faults can cost more than the
// kernel that writes the block, so its time depended on whether glibc had kept the last outputs mapped
// (measurements: benchmarks/results/design-measurements.md). A model calls these ops with
// the same shapes in every layer and step, so a freed output block is kept and handed to the next output of
// about the same size, whose pages are already mapped: no faults, and the time no longer depends on malloc's
// history.
//
// Scope and limits: only blocks of at least 1 MiB (smaller ones come from glibc's heap, already mapped); freed
// blocks are kept up to a byte limit (VLFUSE_CPU_OUTPUT_CACHE_MB, default 1024; 0 turns reuse off), the oldest
// released first; new blocks of 32 MiB or more are backed by transparent huge pages where THP is in madvise
// mode (one fault per 2 MiB). Allocations and frees are reported to the torch profiler like the default CPU
// allocator's. Results never depend on any of it: every byte of an output is written by its kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vlfuse::cpu {

// at::empty for a CPU output a kernel is about to write in full (any other device: plain at::empty).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheStats {
  int64_t limit_bytes = 0;    // most bytes kept in freed blocks
  int64_t cached_bytes = 0;   // bytes in freed blocks waiting for reuse
  int64_t cached_blocks = 0;
  int64_t live_bytes = 0;     // bytes in blocks held by live tensors
  int64_t reused = 0;         // allocations served by a kept block
  int64_t mapped = 0;         // allocations that mapped new memory
  int64_t released = 0;       // blocks returned to the system (over the limit, or emptied)
};

OutputCacheStats output_cache_stats();
// Returns every kept block to the system (blocks held by live tensors are not affected).
void empty_output_cache();
// Sets the limit on kept bytes (0: keep nothing), releasing the oldest kept blocks over it.
void set_output_cache_limit(int64_t bytes);

}  // namespace vlfuse::cpu
