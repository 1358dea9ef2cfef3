#include "common/cpu_memory.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#include <unistd.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace accel {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinPooledBytes = size_t(8) << 20;
constexpr size_t kMinPooledWorkspace = size_t(1) << 20;

// Default: a quarter of physical memory, at most 4 GiB; enough to keep a training step's
// activations of a long-sequence TCN between steps on a workstation.
size_t default_cache_limit() {
  size_t limit = size_t(4) << 30;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min(limit, size_t(pages) * size_t(page) / 4);
#endif
  return limit;
}

size_t cache_limit_bytes() {
  const char* env = std::getenv("ACCEL_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return default_cache_limit();
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0, "ACCEL_CPU_CACHE_MB must be a whole number >= 0, got '",
              env, "'");
  return size_t(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (std::max(nbytes, size_t(1)) + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Reuse a block of this size, or one at most 25% larger.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        Block* b = it->second;
        free_.erase(it);
        cached_ -= b->size;
        in_use_ += b->size;
        ++hits_;
        return {b->ptr, b, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
      }
      ++misses_;
      in_use_ += size;
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, size) != 0 || ptr == nullptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= size;
      TORCH_CHECK(false, "accel: out of CPU memory allocating ", size, " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(ptr, size, MADV_HUGEPAGE);  // advisory; fine if THP is off
#endif
    return {ptr, new Block{ptr, size}, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* ctx) { instance().give_back(static_cast<Block*>(ctx)); }

  void give_back(Block* b) {
    std::unique_lock<std::mutex> lock(mutex_);
    in_use_ -= b->size;
    if (cached_ + b->size <= limit_) {
      cached_ += b->size;
      free_.emplace(b->size, b);
      return;
    }
    lock.unlock();
    std::free(b->ptr);
    delete b;
  }

  void release_all() {
    std::multimap<size_t, Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (auto& [size, b] : drop) {
      std::free(b->ptr);
      delete b;
    }
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(cached_), int64_t(in_use_), hits_, misses_};
  }

  // Never destroyed: tensors freed during interpreter shutdown still find it.
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

 private:
  BlockCache() : limit_(cache_limit_bytes()) {}

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;
  size_t cached_ = 0, in_use_ = 0, limit_;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_for_streaming(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (!options.device().is_cpu() || nbytes < kMinPooledBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

at::Tensor empty_workspace(int64_t nbytes) {
  TORCH_CHECK(nbytes >= 0, "accel: workspace size must be >= 0, got ", nbytes);
  const auto opts = at::TensorOptions().dtype(at::kByte);
  if (size_t(nbytes) < kMinPooledWorkspace) return at::empty({nbytes}, opts);
  return at::detail::empty_generic({nbytes}, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   at::kByte, c10::nullopt);
}

CpuCacheStats cpu_cache_stats() { return BlockCache::instance().stats(); }

void cpu_cache_release() { BlockCache::instance().release_all(); }

}  // namespace accel
