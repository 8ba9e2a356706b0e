// Rotary position embedding in place on x[rows, heads, head_dim], both layouts: half-split
// (HF / NeoX: pairs (i, i + head_dim/2)) and interleaved (GPT-J / llama.cpp: pairs (2i, 2i+1)).
// Angles in f32: position * inv_freq[i] (inv_freq already holds any scaling).
// Grid: (rows, heads); threads over the head_dim/2 pairs.
#include <cuda_bf16.h>

extern "C" __global__ void rope_bf16(
    __nv_bfloat16* __restrict__ x, const int* __restrict__ positions,
    const float* __restrict__ inv_freq, int heads, int head_dim, int interleaved) {
  const int row = blockIdx.x;
  const int head = blockIdx.y;
  const int half = head_dim / 2;
  __nv_bfloat16* v = x + ((size_t)row * heads + head) * head_dim;
  const float pos = (float)positions[row];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = __bfloat162float(v[a]);
    const float x1 = __bfloat162float(v[b]);
    v[a] = __float2bfloat16(x0 * c - x1 * s);
    v[b] = __float2bfloat16(x0 * s + x1 * c);
  }
}
