// The SwiGLU activation in place: gate[i] = silu(gate[i]) * up[i], computed in f32.
// Grid: enough blocks to cover n elements.
#include <cuda_bf16.h>

extern "C" __global__ void silu_mul_bf16(
    __nv_bfloat16* __restrict__ gate, const __nv_bfloat16* __restrict__ up, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float g = __bfloat162float(gate[i]);
    const float u = __bfloat162float(up[i]);
    gate[i] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
  }
}
