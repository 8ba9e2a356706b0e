// RMSNorm fused with the residual add: hidden += delta (when delta is not null), then
// out = hidden / sqrt(mean(hidden^2) + eps) * weight. The sum of squares is accumulated in f32
// over the bf16-rounded residual, which is what the next layer reads.
// Grid: one block per row; blockDim.x a power of two <= 1024; shared memory: blockDim.x floats.
#include <cuda_bf16.h>

extern "C" __global__ void add_rms_norm_bf16(
    __nv_bfloat16* __restrict__ hidden, const __nv_bfloat16* __restrict__ delta,
    const __nv_bfloat16* __restrict__ weight, __nv_bfloat16* __restrict__ out, int dim,
    float eps) {
  extern __shared__ float partial[];
  const int row = blockIdx.x;
  __nv_bfloat16* h = hidden + (size_t)row * dim;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float x = __bfloat162float(h[c]);
    if (delta != nullptr) {
      x += __bfloat162float(delta[(size_t)row * dim + c]);
      const __nv_bfloat16 rounded = __float2bfloat16(x);
      h[c] = rounded;
      x = __bfloat162float(rounded);
    }
    sum += x * x;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float scale = rsqrtf(partial[0] / (float)dim + eps);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const float x = __bfloat162float(h[c]);
    out[(size_t)row * dim + c] = __float2bfloat16(x * scale * __bfloat162float(weight[c]));
  }
}
