// A CUDA execution model on CPU threads, enough for Gristmill's kernels: each block's threads
// are OS threads meeting at __syncthreads (a std::barrier), blocks run one after another,
// dynamic shared memory is one buffer per block, __nv_bfloat16 is emulated bit for bit
// (round to nearest even, as the device's conversion). It proves indexing, reductions and
// masking, not speed, and not the absence of races on a real device.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<unsigned char> shared_memory;

// Runs `kernel` over the grid: blocks one at a time, each block's threads at once. The OS
// threads are started once per launch and walk the blocks together: between blocks they meet
// twice at `outer` (everyone is done with the block; the next block's shared memory and
// barrier are ready). Each block gets a fresh `__syncthreads` barrier, which a thread leaves
// (arrive_and_drop) when it returns from the kernel, as an exited thread stops counting on a
// GPU.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& kernel) {
  block_dim = block;
  grid_dim = grid;
  const unsigned threads = block.x * block.y * block.z;
  const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
  std::optional<std::barrier<>> inner;
  std::barrier<> outer(threads);
  auto start_block = [&] {
    shared_memory.assign(shared_bytes + 16, 0xff);
    inner.emplace(threads);
    block_barrier = &*inner;
  };
  start_block();
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (unsigned long long b = 0; b < blocks; ++b) {
        block_idx = dim3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                         (unsigned)(b / ((unsigned long long)grid.x * grid.y))};
        kernel();
        inner->arrive_and_drop();
        outer.arrive_and_wait();
        if (t == 0 && b + 1 < blocks) start_block();
        outer.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  block_barrier = nullptr;
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __int_as_float(unsigned i) { return __int_as_float((int)i); }
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline int atomicOr(int* address, int value) {
  return std::atomic_ref<int>(*address).fetch_or(value);
}


