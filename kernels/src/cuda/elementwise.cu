// Element-wise ops on bf16 activations, computed in f32 and rounded once.
// add_bf16: x[i] += y[i]. scale_bf16: x[i] *= s. gelu_tanh_mul_bf16: gate[i] =
// gelu_tanh(gate[i]) * up[i] (Gemma's GeGLU). add_bias_bf16: x[r, c] += bias[c] for rows of
// `cols` values.
// Grid: a grid-stride loop over n elements (any grid covers them).
#include <cuda_bf16.h>

#define GRID_STRIDE(i, n)                                                  \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void add_bf16(__nv_bfloat16* __restrict__ x,
                                    const __nv_bfloat16* __restrict__ y, long long n) {
  GRID_STRIDE(i, n) {
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
  }
}

extern "C" __global__ void scale_bf16(__nv_bfloat16* __restrict__ x, float s, long long n) {
  GRID_STRIDE(i, n) { x[i] = __float2bfloat16(__bfloat162float(x[i]) * s); }
}

extern "C" __global__ void gelu_tanh_mul_bf16(__nv_bfloat16* __restrict__ gate,
                                              const __nv_bfloat16* __restrict__ up,
                                              long long n) {
  const float beta = 0.7978846f;  // sqrt(2 / pi)
  const float kappa = 0.044715f;
  GRID_STRIDE(i, n) {
    const float g = __bfloat162float(gate[i]);
    const float inner = beta * (g + kappa * g * g * g);
    gate[i] = __float2bfloat16(0.5f * g * (1.0f + tanhf(inner)) * __bfloat162float(up[i]));
  }
}

extern "C" __global__ void add_bias_bf16(__nv_bfloat16* __restrict__ x,
                                         const __nv_bfloat16* __restrict__ bias, long long n,
                                         int cols) {
  GRID_STRIDE(i, n) {
    x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(bias[i % cols]));
  }
}
