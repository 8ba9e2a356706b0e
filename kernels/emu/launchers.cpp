// C entry points: one per kernel, each launching it over the emulated grid with the arguments
// the Rust side passes (the same launch shapes as kernels/src/cuda/launch.rs chooses).
#include "cuda_bf16.h"

using bf16 = __nv_bfloat16;

extern "C" {
void write_kv_bf16(const bf16*, const bf16*, bf16*, bf16*, const long long*, int, long long, int*);
void paged_attention_bf16(const bf16*, const bf16*, const bf16*, const int*, const int*, int,
                          bf16*, float*, int, int, int, int, int, float, int, int, int, int,
                          long long, int*);
void attention_combine_bf16(const float*, bf16*, int, int, int);
void add_rms_norm_bf16(bf16*, const bf16*, const bf16*, bf16*, int, float);
void argmax_f32(const float*, int, unsigned int*);
void silu_mul_bf16(bf16*, const bf16*, long long);
void embedding_bf16(const bf16*, const unsigned int*, bf16*, int, int, unsigned int, unsigned int);
void rope_bf16(bf16*, const int*, const float*, int, int, int);
void add_bf16(bf16*, const bf16*, long long);
void scale_bf16(bf16*, float, long long);
void gelu_tanh_mul_bf16(bf16*, const bf16*, long long);
void add_bias_bf16(bf16*, const bf16*, long long, int);

void emu_write_kv_bf16(dim3 grid, dim3 block, size_t shared, const bf16* k, const bf16* v,
                       bf16* kc, bf16* vc, const long long* slots, int width,
                       long long cache_slots, int* violations) {
  emu::launch(grid, block, shared, [&] { write_kv_bf16(k, v, kc, vc, slots, width, cache_slots, violations); });
}

void emu_paged_attention_bf16(dim3 grid, dim3 block, size_t shared, const bf16* q,
                              const bf16* kc, const bf16* vc, const int* tables,
                              const int* groups, int q_rows, bf16* out, float* partial,
                              int heads, int kv_heads, int head_dim, int block_size,
                              int max_blocks, float scale, int window, int group_rows,
                              int key_tile, int partition_size, long long cache_slots,
                              int* violations) {
  emu::launch(grid, block, shared, [&] {
    paged_attention_bf16(q, kc, vc, tables, groups, q_rows, out, partial, heads, kv_heads,
                         head_dim, block_size, max_blocks, scale, window, group_rows, key_tile,
                         partition_size, cache_slots, violations);
  });
}

void emu_attention_combine_bf16(dim3 grid, dim3 block, size_t shared, const float* partial,
                                bf16* out, int heads, int head_dim, int partitions) {
  emu::launch(grid, block, shared, [&] { attention_combine_bf16(partial, out, heads, head_dim, partitions); });
}

void emu_add_rms_norm_bf16(dim3 grid, dim3 block, size_t shared, bf16* hidden, const bf16* delta,
                           const bf16* weight, bf16* out, int dim, float eps) {
  emu::launch(grid, block, shared, [&] { add_rms_norm_bf16(hidden, delta, weight, out, dim, eps); });
}

void emu_argmax_f32(dim3 grid, dim3 block, size_t shared, const float* logits, int vocab,
                    unsigned int* out) {
  emu::launch(grid, block, shared, [&] { argmax_f32(logits, vocab, out); });
}

void emu_silu_mul_bf16(dim3 grid, dim3 block, size_t shared, bf16* gate, const bf16* up,
                       long long n) {
  emu::launch(grid, block, shared, [&] { silu_mul_bf16(gate, up, n); });
}

void emu_embedding_bf16(dim3 grid, dim3 block, size_t shared, const bf16* table,
                        const unsigned int* ids, bf16* out, int rows, int dim,
                        unsigned int first_id, unsigned int table_rows) {
  emu::launch(grid, block, shared, [&] { embedding_bf16(table, ids, out, rows, dim, first_id, table_rows); });
}

void emu_rope_bf16(dim3 grid, dim3 block, size_t shared, bf16* x, const int* positions,
                   const float* inv_freq, int heads, int head_dim, int interleaved) {
  emu::launch(grid, block, shared, [&] { rope_bf16(x, positions, inv_freq, heads, head_dim, interleaved); });
}

void emu_add_bf16(dim3 grid, dim3 block, size_t shared, bf16* x, const bf16* y, long long n) {
  emu::launch(grid, block, shared, [&] { add_bf16(x, y, n); });
}

void emu_scale_bf16(dim3 grid, dim3 block, size_t shared, bf16* x, float s, long long n) {
  emu::launch(grid, block, shared, [&] { scale_bf16(x, s, n); });
}

void emu_gelu_tanh_mul_bf16(dim3 grid, dim3 block, size_t shared, bf16* gate, const bf16* up,
                            long long n) {
  emu::launch(grid, block, shared, [&] { gelu_tanh_mul_bf16(gate, up, n); });
}

void emu_add_bias_bf16(dim3 grid, dim3 block, size_t shared, bf16* x, const bf16* bias,
                       long long n, int cols) {
  emu::launch(grid, block, shared, [&] { add_bias_bf16(x, bias, n, cols); });
}
}
