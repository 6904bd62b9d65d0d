// What the torch bindings (ops.cpp) and the per-ISA kernels (kernels.cpp) share: plain-data
// argument structs and the table of kernel entry points one ISA build exports.
//
// The kernels never see a torch header: they take raw pointers, strides and sizes, and process a
// range [begin, end) of independent work items. The bindings check the tensors, fill the args,
// and split the range over torch's own thread pool (at::parallel_for), so the engine runs one
// OpenMP runtime, torch's, whichever kernels run.
#pragma once

#include <cstdint>

namespace sgl_kernel {

struct bf16 {
  uint16_t bits;
};

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1 };

// out[t] = rmsnorm(x[t] (+ residual[t])) * weight, rows of `hidden` elements.
// With `residual`, the sum x + residual is written back to residual (the next layer's residual).
struct RMSNormArgs {
  void* out;
  int64_t out_stride;
  const void* x;
  int64_t x_stride;
  void* residual;  // nullable
  int64_t residual_stride;
  const void* weight;
  int64_t hidden;
  float eps;
  DType dtype;  // of out, x, residual and weight alike
};

// In-place neox rotary embedding of q [T, Hq, D] and k [T, Hk, D] (head dim contiguous).
struct RopeArgs {
  void* q;
  int64_t q_stride_t, q_stride_h, num_q_heads;
  void* k;
  int64_t k_stride_t, k_stride_h, num_k_heads;
  const int64_t* positions;
  const float* cos;  // [max_position, D / 2]
  const float* sin;
  int64_t head_dim;
  DType dtype;
};

// out[r] = the index of row r's largest value (torch.argmax's: the first of equal maxima, or the
// first NaN of a row holding one); x float32 [rows, n].
struct ArgmaxArgs {
  const float* x;
  int64_t x_stride, n;
  int64_t* out;
};

// out[t, i] = silu(x[t, i]) * x[t, width + i]
struct SiluAndMulArgs {
  void* out;
  int64_t out_stride;
  const void* x;
  int64_t x_stride;
  int64_t width;
  DType dtype;
};

// k_cache[loc[t]] = k[t], v_cache[loc[t]] = v[t]: rows of Hkv * D, converted to the cache dtype.
struct StoreKVArgs {
  void* k_cache;
  void* v_cache;  // [slots, Hkv, D] contiguous
  const void* k;
  const void* v;
  int64_t k_stride_t, k_stride_h, v_stride_t, v_stride_h;
  const int64_t* loc;
  int64_t num_kv_heads, head_dim;
  DType src_dtype, cache_dtype;
};

// Attention of a batch's queries over the paged KV pool, reading K and V in place through
// req_to_token (row req_pool_indices[b] lists request b's slots, token by token).
struct AttnArgs {
  const void* q;  // [T, H, D]
  int64_t q_stride_t, q_stride_h;
  void* out;  // [T, H, D]
  int64_t out_stride_t, out_stride_h;
  const void* k_cache;
  const void* v_cache;  // [slots, Hkv, D]
  const int64_t* req_to_token;
  int64_t req_to_token_stride;
  const int64_t* req_pool_indices;  // [B]
  const int64_t* seq_lens;  // [B] tokens in the cache, this forward's included
  const int64_t* q_start;  // [B] first query row of each request (extend only)
  const int64_t* extend_lens;  // [B] query rows of each request (extend only)
  int64_t batch_size, num_heads, num_kv_heads, head_dim;
  float scale;
  // decode: each (request, kv head) is split into `num_splits` runs of `split_len` tokens whose
  // partial results (acc [G, D], max [G], sum [G]) go to `partials` and are merged after.
  int64_t num_splits, split_len;
  float* partials;
  DType q_dtype, kv_dtype;  // out has q_dtype
};

// One unit of extend work: a block of up to kExtendBlockM query rows of one request, all the
// query heads of one KV head.
struct ExtendItem {
  int64_t req, kv_head, row_begin, row_end;  // rows relative to the request's first query row
};
constexpr int64_t kExtendBlockM = 32;

// y[M, N] = x[M, K] @ W[N, K]^T (+ bias): bf16 inputs and weights, float32 accumulation.
// W is prepacked (pack_linear_weight) into blocks of 16 outputs: [N / 16][K / 2][16][2].
struct LinearArgs {
  const bf16* x;
  int64_t x_stride;
  const float* x32;  // x in float32, for ISAs without bf16 dot products (KernelTable::linear_bf16_dot)
  int64_t x32_stride;
  const bf16* packed_w;
  const float* bias;  // nullable, [N] float32
  void* out;
  int64_t out_stride;
  int64_t m, n, k;
  int64_t blocks_per_item;  // 1 to 4 blocks of 16 outputs per work item
  DType out_dtype;
};
constexpr int64_t kLinearBlockN = 16;

// The head dims the attention kernels are compiled for (kernels.cpp's dispatch_attn).
constexpr int64_t kAttnHeadDims[] = {16, 32, 64, 80, 96, 128, 256};

struct KernelTable {
  const char* name;
  void (*rmsnorm)(const RMSNormArgs&, int64_t begin, int64_t end);  // rows
  void (*rope)(const RopeArgs&, int64_t begin, int64_t end);  // tokens
  void (*silu_and_mul)(const SiluAndMulArgs&, int64_t begin, int64_t end);  // rows
  void (*argmax)(const ArgmaxArgs&, int64_t begin, int64_t end);  // rows
  void (*store_kv)(const StoreKVArgs&, int64_t begin, int64_t end);  // tokens
  void (*decode_attention)(const AttnArgs&, int64_t begin, int64_t end);  // (b, kv head, split)
  void (*decode_merge)(const AttnArgs&, int64_t begin, int64_t end);  // (b, head)
  void (*extend_attention)(const AttnArgs&, const ExtendItem*, int64_t begin, int64_t end);
  void (*linear)(const LinearArgs&, int64_t begin, int64_t end);  // items of blocks_per_item x 16 outputs
  // whether linear multiplies bf16 pairs itself (AVX512-BF16) or widens them to float32 and reads x32
  bool linear_bf16_dot;
};

}  // namespace sgl_kernel
