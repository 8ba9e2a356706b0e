// Embedding gather for a vocabulary shard: out[r, :] = table[ids[r] - first_id, :], zeros for
// ids outside the shard (their rows come from another rank's all-reduce).
// Grid: one block per row. bf16 in and out.
#include <cuda_bf16.h>

extern "C" __global__ void embedding_bf16(
    const __nv_bfloat16* __restrict__ table, const unsigned int* __restrict__ ids,
    __nv_bfloat16* __restrict__ out, int rows, int dim, unsigned int first_id,
    unsigned int table_rows) {
  const int row = blockIdx.x;
  if (row >= rows) return;
  const unsigned int id = ids[row];
  const bool mine = id >= first_id && id - first_id < table_rows;
  const __nv_bfloat16* src = table + (size_t)(id - first_id) * dim;
  __nv_bfloat16* dst = out + (size_t)row * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    dst[c] = mine ? src[c] : __float2bfloat16(0.0f);
  }
}
