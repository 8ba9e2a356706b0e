// Attention over a paged KV cache, flash style, for prefill and decode alike.
//
// The host packs a step's query rows into groups: up to group_rows consecutive rows of one
// sequence, at positions pos .. pos + n (groups[3 * g] = first row in q, [3 * g + 1] = n,
// [3 * g + 2] = pos), with the sequence's block table (tables: [groups, max_blocks]). A block
// of the grid (groups, heads, partitions) takes one group, one query head and one partition of
// the context: it walks the partition's keys in tiles of key_tile, loads each tile of keys and
// values into shared memory once for all the group's rows, scores every (row, key) pair, and
// keeps a running max, sum and weighted sum of values per row (online softmax, in f32). Row r
// of the group (position pos + r) attends keys pos + r + 1 - window .. pos + r (all from 0
// when window is 0): causal within the step, over the cached prefix before it.
//
// One partition: the block writes its rows' outputs (bf16). Several (contexts longer than a
// partition, split at fixed positions: split-K, more blocks for long decodes): it writes each
// row's unnormalised sums and its max and sum to partial ([rows, heads, partitions,
// head_dim + 2], f32), and attention_combine_bf16 merges the partitions (an empty one is
// skipped, and a row with one non-empty partition gets exactly what one partition writes).
//
// q, out: [rows, heads, head_dim]; caches: [blocks * block_size, kv_heads * head_dim].
// Block: any number of threads T with group_rows * head_dim <= 16 * T (each thread keeps at
// most 16 output accumulators). Shared memory: (group_rows + 2 * key_tile) * head_dim
// + group_rows * key_tile + 3 * group_rows + 1 floats (kernels::shapes::paged_attention).
//
// Bounds: a group whose rows fall outside q (q_rows rows) or whose context would need table
// entries beyond max_blocks is not read (bit 2 of *violations; its rows, when inside q, get
// zeros); a block id whose slots fall outside [0, cache_slots) stops the block's reads (bit 4;
// zeros).
#include <cuda_bf16.h>

#define ACC_MAX 16

extern "C" __global__ void paged_attention_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ tables,
    const int* __restrict__ groups, int q_rows, __nv_bfloat16* __restrict__ out,
    float* __restrict__ partial, int heads, int kv_heads, int head_dim, int block_size,
    int max_blocks, float scale, int window, int group_rows, int key_tile, int partition_size,
    long long cache_slots, int* __restrict__ violations) {
  extern __shared__ float smem[];
  const int G = group_rows, KT = key_tile, hd = head_dim;
  float* qs = smem;                // [G, hd]
  float* ks = qs + G * hd;         // [KT, hd]
  float* vs = ks + KT * hd;        // [KT, hd]
  float* s = vs + KT * hd;         // [G, KT]
  float* m = s + G * KT;           // [G]
  float* l = m + G;                // [G]
  float* corr = l + G;             // [G]
  float* bad = corr + G;           // [1]: a block id outside the cache was met

  const int grp = blockIdx.x, head = blockIdx.y, part = blockIdx.z;
  const int parts = gridDim.z;
  const int tid = threadIdx.x, T = blockDim.x;
  const int row0 = groups[3 * grp], n = groups[3 * grp + 1], pos0 = groups[3 * grp + 2];
  const int kv_head = head / (heads / kv_heads);
  const long long width = (long long)kv_heads * hd;
  const float neg_inf = __int_as_float(0xff800000);

  // The group's rows inside q, and its context (keys 0 .. pos0 + n) inside the block table.
  const bool rows_ok = n >= 1 && n <= G && row0 >= 0 && (long long)row0 + n <= q_rows;
  const bool ok = rows_ok && pos0 >= 0 &&
                  (long long)pos0 + n <= (long long)max_blocks * block_size;
  if (!ok && tid == 0) atomicOr(violations, 2);
  const int ctx = ok ? pos0 + n : 0;
  const int rows = ok ? n : 0;
  // This partition's keys, from the tile holding the earliest key any row of the group sees.
  // Tiles start at multiples of key_tile (partition_size is one), whatever the group: a row
  // meets its keys in the same tiles, in the same order, however the rows were grouped and
  // batched (tiles it sees nothing of change nothing, exactly), so its result is the same.
  int k_begin = part * partition_size;
  int earliest = window > 0 ? pos0 + 1 - window : 0;
  if (earliest > 0) earliest -= earliest % KT;
  if (k_begin < earliest) k_begin = earliest;
  int k_end = (part + 1) * partition_size;
  if (k_end > ctx) k_end = ctx;

  for (int i = tid; i < G * hd; i += T) {
    const int g = i / hd, d = i % hd;
    qs[i] = g < rows ? __bfloat162float(q[((size_t)(row0 + g) * heads + head) * hd + d]) : 0.0f;
  }
  if (tid < G) {
    m[tid] = neg_inf;
    l[tid] = 0.0f;
  }
  if (tid == 0) bad[0] = 0.0f;
  float acc[ACC_MAX];
  for (int i = 0; i < ACC_MAX; ++i) acc[i] = 0.0f;
  __syncthreads();

  for (int t0 = k_begin; t0 < k_end; t0 += KT) {
    const int nk = k_end - t0 < KT ? k_end - t0 : KT;
    for (int i = tid; i < nk * hd; i += T) {
      const int j = i / hd, d = i % hd;
      const int p = t0 + j;
      const long long block = tables[(size_t)grp * max_blocks + p / block_size];
      const long long slot = block * block_size + p % block_size;
      if (block < 0 || slot >= cache_slots) {
        bad[0] = 1.0f;
      } else {
        const size_t at = (size_t)slot * width + (size_t)kv_head * hd + d;
        ks[i] = __bfloat162float(k_cache[at]);
        vs[i] = __bfloat162float(v_cache[at]);
      }
    }
    __syncthreads();
    // The same for every thread: all leave together (none is left at a barrier).
    if (bad[0] != 0.0f) break;
    for (int i = tid; i < G * KT; i += T) {
      const int g = i / KT, j = i % KT;
      const int p = t0 + j, at = pos0 + g;  // key position, row position
      const bool seen = g < rows && j < nk && p <= at && (window <= 0 || p > at - window);
      float dot = 0.0f;
      if (seen) {
        for (int d = 0; d < hd; ++d) dot += qs[g * hd + d] * ks[j * hd + d];
      }
      s[i] = seen ? dot * scale : neg_inf;
    }
    __syncthreads();
    if (tid < G) {
      const int g = tid;
      float mx = m[g];
      for (int j = 0; j < KT; ++j) mx = fmaxf(mx, s[g * KT + j]);
      const float c = mx == neg_inf ? 1.0f : expf(m[g] - mx);
      float sum = 0.0f;
      for (int j = 0; j < KT; ++j) {
        const float e = s[g * KT + j] == neg_inf ? 0.0f : expf(s[g * KT + j] - mx);
        s[g * KT + j] = e;
        sum += e;
      }
      l[g] = l[g] * c + sum;
      m[g] = mx;
      corr[g] = c;
    }
    __syncthreads();
    for (int i = 0; i < ACC_MAX; ++i) {
      const int o = tid + i * T;
      if (o >= G * hd) break;
      const int g = o / hd, d = o % hd;
      float a = acc[i] * corr[g];
      for (int j = 0; j < nk; ++j) a += s[g * KT + j] * vs[j * hd + d];
      acc[i] = a;
    }
    __syncthreads();
  }
  if (bad[0] != 0.0f && tid == 0) atomicOr(violations, 4);
  const bool refused = bad[0] != 0.0f || !ok;
  for (int i = 0; i < ACC_MAX; ++i) {
    const int o = tid + i * T;
    if (o >= G * hd) break;
    const int g = o / hd, d = o % hd;
    if (!rows_ok || g >= n) continue;
    const size_t row = (size_t)(row0 + g) * heads + head;
    if (parts == 1) {
      const float v = !refused && l[g] > 0.0f ? acc[i] / l[g] : 0.0f;
      out[row * hd + d] = __float2bfloat16(v);
    } else {
      float* p = partial + (row * parts + part) * (hd + 2);
      p[d] = refused ? 0.0f : acc[i];
      if (d == 0) {
        p[hd] = refused ? neg_inf : m[g];
        p[hd + 1] = refused ? 0.0f : l[g];
      }
    }
  }
}

// Merges the partitions of paged_attention_bf16: out = sum_p e^(m_p - M) acc_p / sum_p
// e^(m_p - M) l_p with M the largest m_p. Grid: (rows, heads); any block size.
extern "C" __global__ void attention_combine_bf16(const float* __restrict__ partial,
                                                  __nv_bfloat16* __restrict__ out, int heads,
                                                  int head_dim, int partitions) {
  const size_t row = (size_t)blockIdx.x * heads + blockIdx.y;
  const int hd = head_dim;
  const float* p = partial + row * partitions * (hd + 2);
  const float neg_inf = __int_as_float(0xff800000);
  float mx = neg_inf;
  for (int k = 0; k < partitions; ++k) mx = fmaxf(mx, p[k * (hd + 2) + hd]);
  float total = 0.0f;
  for (int k = 0; k < partitions; ++k) {
    const float mk = p[k * (hd + 2) + hd];
    if (mk != neg_inf) total += expf(mk - mx) * p[k * (hd + 2) + hd + 1];
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float sum = 0.0f;
    for (int k = 0; k < partitions; ++k) {
      const float mk = p[k * (hd + 2) + hd];
      if (mk != neg_inf) sum += expf(mk - mx) * p[k * (hd + 2) + d];
    }
    out[row * hd + d] = __float2bfloat16(total > 0.0f ? sum / total : 0.0f);
  }
}
