// The output block cache of cpu_memory.h: a c10::Allocator whose blocks are anonymous mappings, kept on free
// (up to a byte limit) and handed to later outputs of about the same size.
#include "common/cpu_memory.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace vlfuse::cpu {

namespace {

constexpr size_t kMiB = size_t(1) << 20;
constexpr size_t kMinCachedBytes = kMiB;
constexpr size_t kHugePage = 2 * kMiB;
// glibc always maps blocks this large anew; they are also the ones worth a huge-page hint.
constexpr size_t kHugeMinBytes = 32 * kMiB;
constexpr size_t kSmallGranule = 64 * 1024;
constexpr int64_t kDefaultLimitMiB = 1024;

size_t round_up(size_t n, size_t granule) {
  return (n + granule - 1) / granule * granule;
}

struct Block {
  void* ptr = nullptr;
  size_t bytes = 0;       // mapped length
  size_t requested = 0;   // what the live tensor asked for (reported to the profiler)
  uint64_t freed_at = 0;  // release order among kept blocks: the oldest goes first
};

int64_t limit_from_env() {
  const char* value = std::getenv("VLFUSE_CPU_OUTPUT_CACHE_MB");
  if (value == nullptr || *value == '\0') {
    return kDefaultLimitMiB * static_cast<int64_t>(kMiB);
  }
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && mib >= 0,
                    "vlfuse: VLFUSE_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got '", value, "'");
  return static_cast<int64_t>(mib) * static_cast<int64_t>(kMiB);
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) {
      return c10::GetDefaultCPUAllocator()->allocate(n);
    }
    const size_t bytes = round_up(n, n >= kHugeMinBytes ? kHugePage : kSmallGranule);
    std::unique_lock<std::mutex> lock(mutex_);
    Block* block = take_locked(bytes);
    if (block == nullptr) {
      lock.unlock();  // mapping (and the kernel zeroing it later) needs no lock
      block = map_block(bytes);
      lock.lock();
      ++mapped_;
    }
    block->requested = n;
    live_bytes_ += block->bytes;
    report_locked(block->ptr, static_cast<int64_t>(n));
    return {block->ptr, block, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    OutputCacheStats s;
    s.limit_bytes = limit_;
    s.cached_bytes = static_cast<int64_t>(cached_bytes_);
    s.cached_blocks = static_cast<int64_t>(kept_.size());
    s.live_bytes = static_cast<int64_t>(live_bytes_);
    s.reused = reused_;
    s.mapped = mapped_;
    s.released = released_;
    return s;
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK_VALUE(bytes >= 0, "vlfuse.set_output_cache_limit: bytes must be >= 0, got ", bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked(static_cast<size_t>(limit_));
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim_locked(0);
  }

  static OutputCache& get() {
    // Never destroyed: tensors may be freed during interpreter teardown, after static destructors ran.
    static OutputCache* cache = [] {
      auto* created = new OutputCache();
#if defined(__linux__)
      // A fork (DataLoader workers) while another thread holds the lock would leave it held forever in the child.
      pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
#endif
      return created;
    }();
    return *cache;
  }

 private:
  static void release(void* context) {
    get().give_back(static_cast<Block*>(context));
  }

  void give_back(Block* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_bytes_ -= block->bytes;
    report_locked(block->ptr, -static_cast<int64_t>(block->requested));
    if (block->bytes > static_cast<size_t>(limit_)) {
      unmap_locked(block);
      return;
    }
    trim_locked(static_cast<size_t>(limit_) - block->bytes);
    block->freed_at = ++clock_;
    kept_.emplace(block->bytes, block);
    cached_bytes_ += block->bytes;
  }

  // The smallest kept block that fits, unless it is over a quarter larger than asked (a big block held by a
  // small output would leave the next big output to map anew).
  Block* take_locked(size_t bytes) {
    auto it = kept_.lower_bound(bytes);
    if (it == kept_.end() || it->first > bytes + bytes / 4) {
      return nullptr;
    }
    Block* block = it->second;
    kept_.erase(it);
    cached_bytes_ -= block->bytes;
    ++reused_;
    return block;
  }

  // Releases the oldest kept blocks until at most `keep` bytes are kept.
  void trim_locked(size_t keep) {
    while (cached_bytes_ > keep) {
      auto oldest = kept_.begin();
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if (it->second->freed_at < oldest->second->freed_at) {
          oldest = it;
        }
      }
      Block* block = oldest->second;
      kept_.erase(oldest);
      cached_bytes_ -= block->bytes;
      unmap_locked(block);
    }
  }

  Block* map_block(size_t bytes) {
    void* ptr = map_bytes(bytes);
    if (ptr == nullptr) {
      empty();  // kept blocks may be what stands between this request and the system's limit
      ptr = map_bytes(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr, "vlfuse: could not allocate ", bytes,
                     " bytes of CPU memory for an op output");
    return new Block{ptr, bytes, 0, 0};
  }

  static void* map_bytes(size_t bytes) {
#if defined(__linux__)
    if (bytes < kHugeMinBytes) {
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      return p == MAP_FAILED ? nullptr : p;
    }
    // Over-map by a huge page and cut the ends off so the block starts on a 2 MiB boundary: every one of its
    // pages can then be a huge page.
    const size_t span = bytes + kHugePage;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      return nullptr;
    }
    const auto begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (begin + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
    if (aligned > begin) {
      munmap(raw, aligned - begin);
    }
    const uintptr_t tail = aligned + bytes;
    if (begin + span > tail) {
      munmap(reinterpret_cast<void*>(tail), begin + span - tail);
    }
#if defined(MADV_HUGEPAGE)
    madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // a hint: errors change nothing
#endif
    return reinterpret_cast<void*>(aligned);
#else
    return std::aligned_alloc(kHugePage, bytes);
#endif
  }

  void unmap_locked(Block* block) {
#if defined(__linux__)
    munmap(block->ptr, block->bytes);
#else
    std::free(block->ptr);
#endif
    ++released_;
    delete block;
  }

  void report_locked(void* ptr, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, live_bytes_, live_bytes_ + cached_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  int64_t limit_;
  std::multimap<size_t, Block*> kept_;
  size_t cached_bytes_ = 0;
  size_t live_bytes_ = 0;
  uint64_t clock_ = 0;
  int64_t reused_ = 0;
  int64_t mapped_ = 0;
  int64_t released_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu() || options.pinned_memory()) {
    return at::empty(sizes, options);
  }
  return at::Tensor(at::detail::empty_generic(sizes, &OutputCache::get(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              c10::typeMetaToScalarType(options.dtype()), std::nullopt));
}

OutputCacheStats output_cache_stats() {
  return OutputCache::get().stats();
}

void empty_output_cache() {
  OutputCache::get().empty();
}

void set_output_cache_limit(int64_t bytes) {
  OutputCache::get().set_limit(bytes);
}

}  // namespace vlfuse::cpu
