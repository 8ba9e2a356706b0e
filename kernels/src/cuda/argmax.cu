// Greedy sampling: the index of each row's largest logit (the lowest index among equals, as the
// CPU sampler does). Grid: one block per row; blockDim.x a power of two <= 1024; shared memory:
// blockDim.x floats followed by blockDim.x ints.
extern "C" __global__ void argmax_f32(
    const float* __restrict__ logits, int vocab, unsigned int* __restrict__ out) {
  extern __shared__ float shared[];
  float* best = shared;
  int* index = (int*)(shared + blockDim.x);
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float b = __int_as_float(0xff800000);
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    if (x > b || (x == b && i < bi)) {
      b = x;
      bi = i;
    }
  }
  best[threadIdx.x] = b;
  index[threadIdx.x] = bi;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float o = best[threadIdx.x + stride];
      const int oi = index[threadIdx.x + stride];
      if (o > best[threadIdx.x] || (o == best[threadIdx.x] && oi < index[threadIdx.x])) {
        best[threadIdx.x] = o;
        index[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = (unsigned int)(index[0] == 0x7fffffff ? 0 : index[0]);
}
