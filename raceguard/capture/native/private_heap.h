// The native shadow memory's own heap: memory from mmap, never from the target's malloc heap.
//
// Why: the shadow entries, their vectors and the tables' nodes live as long as the storages they
// describe, and are allocated while the target allocates and frees tensor data. On malloc's
// heap they sat between the target's freed chunks and kept glibc from reusing or trimming them:
// a two-thread Transformer training ran at 500 MB peak RSS against 335 MB without raceguard
// (malloc's own count of bytes in use stayed at 137 MB). Python's objects never had this
// effect: pymalloc takes its arenas from mmap too.
//
// Not thread-safe: everything allocated here is made and freed with the GIL held (the drain,
// the tables, the sites), which serialises it.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <new>

namespace private_heap {

constexpr size_t kMinClass = 16;
constexpr int kClasses = 8;             // 16, 32, ..., 2048 bytes
constexpr size_t kSlabBytes = 1 << 18;  // small blocks are carved from 256 KiB slabs

struct FreeBlock {
  FreeBlock* next;
};

inline FreeBlock* g_free[kClasses] = {};
inline char* g_slab = nullptr;  // the unused rest of the current slab
inline size_t g_slab_left = 0;

inline int class_of(size_t bytes) {
  size_t size = kMinClass;
  for (int c = 0; c < kClasses; ++c, size <<= 1)
    if (bytes <= size) return c;
  return -1;
}

inline void* map_bytes(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  return p;
}

inline size_t page_round(size_t bytes) {
  constexpr size_t page = 4096;
  return (bytes + page - 1) & ~(page - 1);
}

inline void* allocate(size_t bytes) {
  if (bytes == 0) bytes = 1;
  const int c = class_of(bytes);
  if (c < 0) return map_bytes(page_round(bytes));  // large: its own mapping
  if (FreeBlock* b = g_free[c]) {
    g_free[c] = b->next;
    return b;
  }
  const size_t size = kMinClass << c;
  if (g_slab_left < size) {  // the rest of the old slab goes to the free lists it fits
    while (g_slab_left >= kMinClass) {
      int k = kClasses - 1;
      while ((kMinClass << k) > g_slab_left) --k;
      auto* b = reinterpret_cast<FreeBlock*>(g_slab);
      b->next = g_free[k];
      g_free[k] = b;
      g_slab += kMinClass << k;
      g_slab_left -= kMinClass << k;
    }
    g_slab = static_cast<char*>(map_bytes(kSlabBytes));
    g_slab_left = kSlabBytes;
  }
  void* p = g_slab;
  g_slab += size;
  g_slab_left -= size;
  return p;
}

inline void deallocate(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (bytes == 0) bytes = 1;
  const int c = class_of(bytes);
  if (c < 0) {
    munmap(p, page_round(bytes));
    return;
  }
  auto* b = static_cast<FreeBlock*>(p);
  b->next = g_free[c];
  g_free[c] = b;
}

// A std allocator over the private heap (for the containers the shadow memory keeps).
template <class T>
struct Allocator {
  using value_type = T;
  Allocator() noexcept = default;
  template <class U>
  Allocator(const Allocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(private_heap::allocate(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { private_heap::deallocate(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const Allocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const Allocator<U>&) const noexcept { return false; }
};

// Objects of a class deriving from this are allocated on the private heap.
struct Allocated {
  static void* operator new(size_t bytes) { return private_heap::allocate(bytes); }
  static void operator delete(void* p, size_t bytes) noexcept { private_heap::deallocate(p, bytes); }
};

}  // namespace private_heap
