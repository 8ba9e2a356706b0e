// Stores the new keys and values of a step into their paged cache slots:
// cache[slot[r], :] = k[r, :] (and v). A slot is block * block_size + offset, chosen by the
// scheduler's block tables. Grid: one block per row; width = kv_heads * head_dim.
#include <cuda_bf16.h>

extern "C" __global__ void write_kv_bf16(
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
    const long long* __restrict__ slots, int width) {
  const int row = blockIdx.x;
  const long long slot = slots[row];
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    k_cache[slot * width + c] = k[(size_t)row * width + c];
    v_cache[slot * width + c] = v[(size_t)row * width + c];
  }
}
