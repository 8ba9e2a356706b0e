// Attention over a paged KV cache: one query row per "sequence", grouped-query heads. Decode
// passes one row per sequence; prefill passes each prompt row as its own entry, with the
// sequence's block table and a context length of its position + 1 (causal by construction).
// q: [seqs, heads, head_dim]; caches: [blocks * block_size, kv_heads * head_dim];
// block_tables: [seqs, max_blocks]; context_lens: [seqs] positions to attend (the new one
// included, already written). Scores are q.k * scale; with window > 0 only the last `window`
// positions are attended (a sliding window). Online softmax in f32 (one pass over the context).
// Grid: (seqs, heads); blockDim.x == head_dim (<= 256, a power of two);
// shared memory: head_dim floats.
//
// Bounds: a context length outside [0, max_blocks * block_size] (bit 2 of *violations) or a
// block whose slots fall outside [0, cache_slots) (bit 4) is never read: the head's output is
// zeros and the bit is set, for the host to report (CudaKernels::take_violations).
#include <cuda_bf16.h>

extern "C" __global__ void paged_attention_decode_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ block_tables,
    const int* __restrict__ context_lens, __nv_bfloat16* __restrict__ out, int heads,
    int kv_heads, int head_dim, int block_size, int max_blocks, float scale, int window,
    long long cache_slots, int* __restrict__ violations) {
  extern __shared__ float red[];
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int d = threadIdx.x;
  const int kv_head = head / (heads / kv_heads);
  const int width = kv_heads * head_dim;
  int len = context_lens[seq];
  if (len < 0 || len > max_blocks * block_size) {
    if (d == 0) atomicOr(violations, 2);
    len = 0;
  }
  bool bad = false;
  const float qd = __bfloat162float(q[((size_t)seq * heads + head) * head_dim + d]);
  float m = __int_as_float(0xff800000), l = 0.0f, acc = 0.0f;
  const int first = window > 0 && len > window ? len - window : 0;
  for (int p = first; p < len; ++p) {
    const long long block = block_tables[seq * max_blocks + p / block_size];
    const long long slot = block * block_size + p % block_size;
    // The same for every thread of the block: all leave the loop together (no thread is left
    // waiting at a barrier).
    if (block < 0 || slot >= cache_slots) {
      bad = true;
      break;
    }
    const size_t at = (size_t)slot * width + (size_t)kv_head * head_dim + d;
    red[d] = qd * __bfloat162float(k_cache[at]);
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (d < stride) red[d] += red[d + stride];
      __syncthreads();
    }
    const float s = red[0] * scale;
    __syncthreads();
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new);
    const float w = expf(s - m_new);
    l = l * correction + w;
    acc = acc * correction + w * __bfloat162float(v_cache[at]);
    m = m_new;
  }
  if (bad && d == 0) atomicOr(violations, 4);
  out[((size_t)seq * heads + head) * head_dim + d] =
      __float2bfloat16(len > 0 && !bad ? acc / l : 0.0f);
}
