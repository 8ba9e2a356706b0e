// Stores the new keys and values of a step into their paged cache slots:
// cache[slot[r], :] = k[r, :] (and v). A slot is block * block_size + offset, chosen by the
// scheduler's block tables. Grid: one block per row; width = kv_heads * head_dim.
//
// Bounds: a slot outside [0, cache_slots) is never written; the row is skipped and bit 1 of
// *violations is set, for the host to report (CudaKernels::take_violations).
#include <cuda_bf16.h>

extern "C" __global__ void write_kv_bf16(
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
    const long long* __restrict__ slots, int width, long long cache_slots,
    int* __restrict__ violations) {
  const int row = blockIdx.x;
  const long long slot = slots[row];
  if (slot < 0 || slot >= cache_slots) {
    if (threadIdx.x == 0) atomicOr(violations, 1);
    return;
  }
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    k_cache[slot * width + c] = k[(size_t)row * width + c];
    v_cache[slot * width + c] = v[(size_t)row * width + c];
  }
}
