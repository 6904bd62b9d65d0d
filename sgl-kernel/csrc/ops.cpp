// torch.ops.sgl_kernel.*: tensor checks, then the active ISA's kernels over torch's threads.
//
// The ISA is picked once, at load, as the best this CPU runs (avx512_bf16 > avx512 > avx2 >
// generic); set_isa() switches to any other the CPU supports (tests run every path this way).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <string>
#include <vector>

#include "common.h"
#include "shm.h"

namespace sgl_kernel {
namespace avx512_bf16 { const KernelTable* table(); }
namespace avx512 { const KernelTable* table(); }
namespace avx2 { const KernelTable* table(); }
namespace generic { const KernelTable* table(); }

namespace {

struct Isa {
  const char* name;
  const KernelTable* (*table)();
  bool supported;
};

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

const std::vector<Isa>& isas() {  // best first
  static const std::vector<Isa> all = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return std::vector<Isa>{
        {"avx512_bf16", avx512_bf16::table, cpu_has_avx512() && __builtin_cpu_supports("avx512bf16")},
        {"avx512", avx512::table, cpu_has_avx512()},
        {"avx2", avx2::table, avx2},
        {"generic", generic::table, true},
    };
  }();
  return all;
}

const KernelTable* g_active = nullptr;

const KernelTable& active() {
  if (!g_active) {
    for (const Isa& isa : isas())
      if (isa.supported) {
        g_active = isa.table();
        break;
      }
  }
  return *g_active;
}

std::string isa() { return active().name; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : isas())
    if (isa.supported) names.emplace_back(isa.name);
  return names;
}

void set_isa(const std::string& name) {
  for (const Isa& isa : isas()) {
    if (name == isa.name) {
      TORCH_CHECK(isa.supported, "sgl_kernel: this CPU cannot run the ", name, " kernels");
      g_active = isa.table();
      return;
    }
  }
  TORCH_CHECK(false, "sgl_kernel: unknown ISA '", name, "'");
}

DType dtype_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "sgl_kernel: ", what, " must be on the CPU");
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sgl_kernel: ", what, " must be float32 or bfloat16, got ", t.scalar_type());
  return DType::kFloat32;
}

void check_index(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(),
              "sgl_kernel: ", what, " must be a contiguous int64 CPU tensor");
}

// `body(begin, end)` over n items on torch's threads; inline when the work is one grain
template <typename F>
void parallel(int64_t n, int64_t grain, const F& body) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain, body);
}

// How many threads `parallel` really runs on: torch's thread count when this library was built
// with OpenMP, 1 when it was not (at::parallel_for then runs inline, silently).
int64_t parallel_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (t > seen && !most.compare_exchange_weak(seen, t)) {
    }
  });
  return most.load();
}

void rmsnorm_impl(at::Tensor& out, const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                  const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes() && x.stride(1) == 1 && out.stride(1) == 1,
              "sgl_kernel.rmsnorm: x and out are [T, hidden] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == hidden, "sgl_kernel.rmsnorm: weight is [hidden]");
  RMSNormArgs a{};
  a.dtype = dtype_of(x, "x");
  TORCH_CHECK(dtype_of(out, "out") == a.dtype && dtype_of(weight, "weight") == a.dtype, "sgl_kernel.rmsnorm: one dtype for all");
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 && dtype_of(*residual, "residual") == a.dtype,
                "sgl_kernel.fused_add_rmsnorm: residual is like x");
    a.residual = residual->data_ptr();
    a.residual_stride = residual->stride(0);
  }
  a.weight = weight.data_ptr();
  a.hidden = hidden;
  a.eps = float(eps);
  const auto& k = active();
  parallel(x.size(0), std::max<int64_t>(1, 32768 / hidden), [&](int64_t b, int64_t e) { k.rmsnorm(a, b, e); });
}

void rmsnorm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  rmsnorm_impl(out, x, c10::nullopt, weight, eps);
}

// x <- rmsnorm(x + residual) * weight; residual <- x + residual
void fused_add_rmsnorm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  rmsnorm_impl(x, x, residual, weight, eps);
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                      const at::Tensor& sin) {
  check_index(positions, "positions");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "sgl_kernel.rotary_embedding: q, k are [T, heads, D]");
  const int64_t d = q.size(2);
  TORCH_CHECK(k.size(2) == d && d % 2 == 0 && q.size(0) == positions.numel() && k.size(0) == positions.numel(),
              "sgl_kernel.rotary_embedding: q, k and positions disagree");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(-1) == d / 2 && sin.sizes() == cos.sizes(),
              "sgl_kernel.rotary_embedding: cos and sin are float32 [max_position, D / 2]");
  RopeArgs a{};
  a.dtype = dtype_of(q, "q");
  TORCH_CHECK(dtype_of(k, "k") == a.dtype, "sgl_kernel.rotary_embedding: q and k share a dtype");
  a.q = q.data_ptr();
  a.q_stride_t = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.num_q_heads = q.size(1);
  a.k = k.data_ptr();
  a.k_stride_t = k.stride(0);
  a.k_stride_h = k.stride(1);
  a.num_k_heads = k.size(1);
  a.positions = positions.data_ptr<int64_t>();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.head_dim = d;
  const auto& kt = active();
  const int64_t per_token = (q.size(1) + k.size(1)) * d;
  parallel(positions.numel(), std::max<int64_t>(1, 32768 / per_token), [&](int64_t b, int64_t e) { kt.rope(a, b, e); });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(1) == 2 * out.size(1) && x.size(0) == out.size(0) &&
                  x.stride(1) == 1 && out.stride(1) == 1,
              "sgl_kernel.silu_and_mul: x is [T, 2 I], out [T, I], rows contiguous");
  SiluAndMulArgs a{};
  a.dtype = dtype_of(x, "x");
  TORCH_CHECK(dtype_of(out, "out") == a.dtype, "sgl_kernel.silu_and_mul: out has x's dtype");
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  a.width = out.size(1);
  const auto& k = active();
  parallel(x.size(0), std::max<int64_t>(1, 16384 / a.width), [&](int64_t b, int64_t e) { k.silu_and_mul(a, b, e); });
}

at::Tensor argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu() &&
                  logits.stride(1) == 1 && logits.size(1) > 0,
              "sgl_kernel.argmax: logits are float32 [rows, n > 0] on the CPU, rows contiguous");
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  ArgmaxArgs a{logits.data_ptr<float>(), logits.stride(0), logits.size(1), out.data_ptr<int64_t>()};
  const auto& k = active();
  parallel(logits.size(0), std::max<int64_t>(1, 16384 / a.n), [&](int64_t b, int64_t e) { k.argmax(a, b, e); });
  return out;
}

void store_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& loc, const at::Tensor& k, const at::Tensor& v) {
  check_index(loc, "loc");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
              "sgl_kernel.store_kv: caches are contiguous [slots, Hkv, D]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == loc.numel() && v.size(0) == loc.numel() &&
                  k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(2) && v.sizes() == k.sizes() &&
                  k.stride(2) == 1 && v.stride(2) == 1,
              "sgl_kernel.store_kv: k, v are [T, Hkv, D] matching the cache and loc");
  StoreKVArgs a{};
  a.src_dtype = dtype_of(k, "k");
  a.cache_dtype = dtype_of(k_cache, "k_cache");
  TORCH_CHECK(dtype_of(v, "v") == a.src_dtype && dtype_of(v_cache, "v_cache") == a.cache_dtype, "sgl_kernel.store_kv: k/v dtypes");
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.k_stride_t = k.stride(0);
  a.k_stride_h = k.stride(1);
  a.v_stride_t = v.stride(0);
  a.v_stride_h = v.stride(1);
  a.loc = loc.data_ptr<int64_t>();
  a.num_kv_heads = k.size(1);
  a.head_dim = k.size(2);
  const auto& kt = active();
  parallel(loc.numel(), std::max<int64_t>(1, 16384 / (k.size(1) * k.size(2))), [&](int64_t b, int64_t e) { kt.store_kv(a, b, e); });
}

AttnArgs attn_args(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& req_to_token, const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                   double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && q.stride(2) == 1 && out.stride(2) == 1,
              "sgl_kernel attention: q and out are [T, H, D], head dim contiguous");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes(),
              "sgl_kernel attention: caches are contiguous [slots, Hkv, D]");
  const int64_t d = q.size(2), h = q.size(1), hkv = k_cache.size(1);
  bool known_dim = false;
  for (int64_t dim : kAttnHeadDims) known_dim |= dim == d;
  TORCH_CHECK(k_cache.size(2) == d && known_dim, "sgl_kernel attention: head_dim must be one of 16, 32, 64, 80, 96, 128, 256, got ", d);
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "sgl_kernel attention: ", h, " query heads do not group over ", hkv, " KV heads");
  TORCH_CHECK(req_to_token.dim() == 2 && req_to_token.stride(1) == 1 && req_to_token.scalar_type() == at::kLong,
              "sgl_kernel attention: req_to_token is int64 [rows, context]");
  check_index(req_pool_indices, "req_pool_indices");
  check_index(seq_lens, "seq_lens");
  TORCH_CHECK(req_pool_indices.numel() == seq_lens.numel(), "sgl_kernel attention: one pool row and length per request");
  AttnArgs a{};
  a.q_dtype = dtype_of(q, "q");
  a.kv_dtype = dtype_of(k_cache, "k_cache");
  TORCH_CHECK(dtype_of(out, "out") == a.q_dtype && dtype_of(v_cache, "v_cache") == a.kv_dtype,
              "sgl_kernel attention: out has q's dtype, v_cache k_cache's");
  TORCH_CHECK(!(a.q_dtype == DType::kBFloat16 && a.kv_dtype == DType::kFloat32),
              "sgl_kernel attention: bfloat16 queries need a bfloat16 cache");
  a.q = q.data_ptr();
  a.q_stride_t = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.out = out.data_ptr();
  a.out_stride_t = out.stride(0);
  a.out_stride_h = out.stride(1);
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.req_to_token = req_to_token.data_ptr<int64_t>();
  a.req_to_token_stride = req_to_token.stride(0);
  a.req_pool_indices = req_pool_indices.data_ptr<int64_t>();
  a.seq_lens = seq_lens.data_ptr<int64_t>();
  a.batch_size = seq_lens.numel();
  a.num_heads = h;
  a.num_kv_heads = hkv;
  a.head_dim = d;
  a.scale = float(scale);
  return a;
}

// One query token per request: out[b] attends over request b's seq_lens[b] cached tokens.
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& req_to_token, const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                      double scale) {
  AttnArgs a = attn_args(out, q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale);
  TORCH_CHECK(q.size(0) == a.batch_size, "sgl_kernel.decode_attention: one query row per request");
  if (a.batch_size == 0) return;
  int64_t max_len = 0;
  for (int64_t b = 0; b < a.batch_size; ++b) max_len = std::max(max_len, a.seq_lens[b]);
  TORCH_CHECK(max_len >= 1, "sgl_kernel.decode_attention: every request has a token in the cache");
  // Few (request, KV head) pairs and long contexts: split each context so every thread has work,
  // no split shorter than 64 tokens.
  const int64_t pairs = a.batch_size * a.num_kv_heads, threads = at::get_num_threads();
  const int64_t want = (4 * threads + pairs - 1) / pairs, most = (max_len + 63) / 64;
  a.num_splits = std::max<int64_t>(1, std::min(want, most));
  a.split_len = (max_len + a.num_splits - 1) / a.num_splits;
  at::Tensor partials;
  if (a.num_splits > 1) {
    partials = at::empty({pairs * a.num_splits * (a.num_heads / a.num_kv_heads) * (a.head_dim + 2)}, q.options().dtype(at::kFloat));
    a.partials = partials.data_ptr<float>();
  }
  const auto& k = active();
  parallel(pairs * a.num_splits, 1, [&](int64_t b, int64_t e) { k.decode_attention(a, b, e); });
  if (a.num_splits > 1) parallel(a.batch_size * a.num_heads, 4, [&](int64_t b, int64_t e) { k.decode_merge(a, b, e); });
}

// Several query tokens per request (prefill chunks, mixed with decodes): request b's rows
// q_start[b] .. q_start[b] + extend_lens[b] are the last tokens of its seq_lens[b], causal.
void extend_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& req_to_token, const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                      const at::Tensor& extend_lens, const at::Tensor& q_start, double scale) {
  AttnArgs a = attn_args(out, q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale);
  check_index(extend_lens, "extend_lens");
  check_index(q_start, "q_start");
  TORCH_CHECK(extend_lens.numel() == a.batch_size && q_start.numel() == a.batch_size,
              "sgl_kernel.extend_attention: one extend length and query start per request");
  a.extend_lens = extend_lens.data_ptr<int64_t>();
  a.q_start = q_start.data_ptr<int64_t>();
  std::vector<ExtendItem> items;
  for (int64_t b = 0; b < a.batch_size; ++b) {
    const int64_t n = a.extend_lens[b];
    TORCH_CHECK(n >= 0 && n <= a.seq_lens[b] && a.q_start[b] + n <= q.size(0), "sgl_kernel.extend_attention: bad lengths of request ", b);
    for (int64_t r = 0; r < n; r += kExtendBlockM)
      for (int64_t h = 0; h < a.num_kv_heads; ++h) items.push_back({b, h, r, std::min(n, r + kExtendBlockM)});
  }
  const auto& k = active();
  parallel(int64_t(items.size()), 1, [&](int64_t b, int64_t e) { k.extend_attention(a, items.data(), b, e); });
}

// Blocks of 16 outputs per work item: two for one row (small items balance the threads while
// the weights' bandwidth is the limit); for more rows as many as four, the most that still
// splits the blocks evenly over the threads (576 outputs: 36 blocks, 3 per item on 2 threads).
int64_t linear_blocks_per_item(int64_t nblocks, int64_t m, int64_t threads) {
  if (m == 1) return 2;
  int64_t best = 4;
  double best_waste = 2.0;
  for (int64_t per_item = 4; per_item >= 2; --per_item) {
    const int64_t items = (nblocks + per_item - 1) / per_item;
    const int64_t rounds = (items + threads - 1) / threads;
    const double waste = double(rounds * threads * per_item) / double(nblocks);  // >= 1
    if (waste < best_waste - 0.02) {
      best = per_item;
      best_waste = waste;
    }
  }
  return best;
}

// [N, K] -> [ceil(N / 16), K / 2, 16, 2]: each block of 16 outputs streams its K pairs in order.
at::Tensor pack_linear_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "sgl_kernel.pack_linear_weight: weight is bfloat16 [N, K]");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k % 2 == 0, "sgl_kernel.pack_linear_weight: K must be even, got ", k);
  const int64_t np = (n + kLinearBlockN - 1) / kLinearBlockN * kLinearBlockN;
  at::Tensor padded = np == n ? w : at::constant_pad_nd(w, {0, 0, 0, np - n});
  return padded.reshape({np / kLinearBlockN, kLinearBlockN, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// y = x @ W^T + bias for bf16 x and a packed bf16 W (n outputs); y is bf16, or float32 when
// out_float. bias, when given, is float32 with one entry per padded output.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed_w, const c10::optional<at::Tensor>& bias, int64_t n,
                  bool out_float) {
  const auto& kt = active();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "sgl_kernel.linear: x is bfloat16 on the CPU");
  TORCH_CHECK(packed_w.dim() == 4 && packed_w.is_contiguous() && packed_w.size(2) == kLinearBlockN,
              "sgl_kernel.linear: weight comes from pack_linear_weight");
  const int64_t k = packed_w.size(1) * 2, np = packed_w.size(0) * kLinearBlockN;
  TORCH_CHECK(x.size(-1) == k && n <= np && n > np - kLinearBlockN, "sgl_kernel.linear: x has ", x.size(-1), " features, weight ", k);
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  LinearArgs a{};
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == np,
                "sgl_kernel.linear: bias is float32 [padded N]");
    a.bias = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({x2.size(0), np}, x.options().dtype(out_float ? at::kFloat : at::kBFloat16));
  a.x = reinterpret_cast<const bf16*>(x2.data_ptr());
  a.x_stride = x2.stride(0);
  at::Tensor x32;  // ISAs without bf16 dot products read x widened once, here
  if (!kt.linear_bf16_dot) {
    x32 = x2.to(at::kFloat).contiguous();
    a.x32 = x32.data_ptr<float>();
    a.x32_stride = x32.stride(0);
  }
  a.packed_w = reinterpret_cast<const bf16*>(packed_w.data_ptr());
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.m = x2.size(0);
  a.n = np;
  a.k = k;
  a.out_dtype = out_float ? DType::kFloat32 : DType::kBFloat16;
  if (a.m > 0) {
    a.blocks_per_item = linear_blocks_per_item(np / kLinearBlockN, a.m, at::get_num_threads());
    const int64_t items = (np / kLinearBlockN + a.blocks_per_item - 1) / a.blocks_per_item;
    parallel(items, 1, [&](int64_t b, int64_t e) { kt.linear(a, b, e); });
  }
  if (np != n) out = out.narrow(1, 0, n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

// One decoder layer (Llama family) over a decode batch, as the model's Python layers run it
// through the ops above, op for op and in the same order, so the results are the same bits:
//   hidden, residual = add-rmsnorm(hidden, residual) [first layer: residual = hidden,
//   hidden = rmsnorm(hidden)] -> qkv -> rope(q, k) -> store k, v -> decode attention -> o ->
//   add-rmsnorm -> gate_up -> silu-and-mul -> down.
// One call per layer instead of some forty Python-level steps, which took a third of a batch-1
// step. weights: input norm, qkv, o, post-attention norm, gate_up, down (the linears packed);
// biases: the four linears' (float32, padded) or None; sizes: heads, KV heads, head dim and the
// four linears' output sizes. Returns the layer's output; `residual` is updated in place.
// decode_layer_qkv and decode_layer_out are its two halves, for a layer whose attention runs
// elsewhere (a TKNP root scatters q/k/v to the ranks between them).
void check_layer_args(at::TensorList weights, at::ArrayRef<c10::optional<at::Tensor>> biases, at::IntArrayRef sizes,
                      const char* op) {
  TORCH_CHECK(weights.size() == 6 && biases.size() == 4 && sizes.size() == 7, "sgl_kernel.", op,
              ": 6 weights, 4 biases, 7 sizes");
  TORCH_CHECK(sizes[3] == sizes[0] * sizes[2] + 2 * sizes[1] * sizes[2], "sgl_kernel.", op,
              ": the qkv size is not the heads'");
}

// The layer up to attention: norms, qkv, rope. Returns qkv [T, q + 2 kv] (q and k rotated).
at::Tensor decode_layer_qkv(at::Tensor& hidden, at::Tensor& residual, bool add_residual, at::TensorList weights,
                            at::ArrayRef<c10::optional<at::Tensor>> biases, at::IntArrayRef sizes, double eps,
                            const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  check_layer_args(weights, biases, sizes, "decode_layer_qkv");
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && residual.sizes() == hidden.sizes(),
              "sgl_kernel.decode_layer: hidden and residual are [T, H], hidden contiguous");
  const int64_t heads = sizes[0], kv_heads = sizes[1], d = sizes[2], t = hidden.size(0);
  const int64_t q_size = heads * d, kv_size = kv_heads * d;
  at::Tensor x = hidden;
  if (add_residual) {
    fused_add_rmsnorm(x, residual, weights[0], eps);
  } else {
    residual.copy_(hidden);
    x = at::empty_like(hidden);
    rmsnorm(x, hidden, weights[0], eps);
  }
  at::Tensor qkv = linear(x, weights[1], biases[0], sizes[3], false);
  at::Tensor q = qkv.narrow(1, 0, q_size).view({t, heads, d});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({t, kv_heads, d});
  rotary_embedding(positions, q, k, cos, sin);
  return qkv;
}

// The MLP block on the attention block's output `o` (overwritten): add-rmsnorm, gate_up,
// silu-and-mul, down; `residual` updated. Under tensor parallelism `o` is the all-reduced
// o_proj output, and the caller all-reduces what this returns.
at::Tensor decode_layer_mlp(at::Tensor& o, at::Tensor& residual, at::TensorList weights,
                            at::ArrayRef<c10::optional<at::Tensor>> biases, at::IntArrayRef sizes, double eps) {
  check_layer_args(weights, biases, sizes, "decode_layer_mlp");
  TORCH_CHECK(o.dim() == 2 && residual.sizes() == o.sizes(), "sgl_kernel.decode_layer_mlp: o and residual are [T, H]");
  const int64_t t = o.size(0);
  fused_add_rmsnorm(o, residual, weights[3], eps);
  at::Tensor gate_up = linear(o, weights[4], biases[2], sizes[5], false);
  at::Tensor act = at::empty({t, sizes[5] / 2}, gate_up.options());
  silu_and_mul(act, gate_up);
  return linear(act, weights[5], biases[3], sizes[6], false);
}

// The layer after attention: o, then the MLP block; `residual` updated.
at::Tensor decode_layer_out(const at::Tensor& attn, at::Tensor& residual, at::TensorList weights,
                            at::ArrayRef<c10::optional<at::Tensor>> biases, at::IntArrayRef sizes, double eps) {
  check_layer_args(weights, biases, sizes, "decode_layer_out");
  const int64_t t = attn.size(0);
  at::Tensor o = linear(attn.reshape({t, sizes[0] * sizes[2]}), weights[2], biases[1], sizes[4], false);
  return decode_layer_mlp(o, residual, weights, biases, sizes, eps);
}

// Stores a decode batch's k/v and attends: q/k/v are the column blocks of `qkv` [T, q + 2 kv],
// the output goes to `out` [T, q].
void store_and_attend(at::Tensor& out, const at::Tensor& qkv, int64_t heads, int64_t kv_heads, int64_t d, double scale,
                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& loc, const at::Tensor& req_to_token,
                      const at::Tensor& req_pool_indices, const at::Tensor& seq_lens) {
  const int64_t t = qkv.size(0), q_size = heads * d, kv_size = kv_heads * d;
  at::Tensor q = qkv.narrow(1, 0, q_size).view({t, heads, d});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({t, kv_heads, d});
  at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({t, kv_heads, d});
  store_kv(k_cache, v_cache, loc, k, v);
  at::Tensor o = out.view({t, heads, d});
  decode_attention(o, q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale);
}

at::Tensor decode_layer(at::Tensor& hidden, at::Tensor& residual, bool add_residual, at::TensorList weights,
                        at::ArrayRef<c10::optional<at::Tensor>> biases, at::IntArrayRef sizes, double eps, double scale,
                        const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                        at::Tensor& v_cache, const at::Tensor& loc, const at::Tensor& req_to_token,
                        const at::Tensor& req_pool_indices, const at::Tensor& seq_lens) {
  at::Tensor qkv = decode_layer_qkv(hidden, residual, add_residual, weights, biases, sizes, eps, positions, cos, sin);
  at::Tensor attn = at::empty({hidden.size(0), sizes[0] * sizes[2]}, qkv.options());
  store_and_attend(attn, qkv, sizes[0], sizes[1], sizes[2], scale, k_cache, v_cache, loc, req_to_token,
                   req_pool_indices, seq_lens);
  return decode_layer_out(attn, residual, weights, biases, sizes, eps);
}

// ---- TKNP decode attention on shared memory
//
// A TKNP layer's attention in one call per layer on the root and one per forward on a rank:
// the same messages, ops and order as TknpAttentionBackend and serve_attention_layers run them
// (so the same bits), without the Python between them, which was the largest part of the
// exchange's cost on the root's critical path. `channels` args are byte offsets of shm.cpp's
// channels in `segment`.

// Runs `body` on `threads` of torch's threads (0: all of them), restoring the count after.
template <typename F>
void on_threads(int64_t threads, const F& body) {
  const int before = at::get_num_threads();
  if (threads <= 0 || threads == before) {
    body();
    return;
  }
  at::set_num_threads(static_cast<int>(threads));
  try {
    body();
  } catch (...) {
    at::set_num_threads(before);
    throw;
  }
  at::set_num_threads(before);
}

// The root's side of a decode layer's exchange: which rows are whose, the root's own batch and
// the channels. `rows[r]` rows of the layer's qkv are rank r's, in rank order, the root's own
// first; its own batch is read only when it has rows. `stats` (int64 [2]) accumulates the ns
// spent waiting for the ranks' outputs to start arriving and the ns of the whole exchange (sends
// and receives, not the root's own attention), for the benchmarks' shares.
struct RootExchange {
  const at::Tensor& loc;
  const at::Tensor& req_to_token;
  const at::Tensor& req_pool_indices;
  const at::Tensor& seq_lens;
  at::IntArrayRef rows;
  int64_t threads;  // of torch's threads the root attends on (0: all)
  const at::Tensor& segment;
  at::IntArrayRef send_channels, recv_channels;
  int64_t slot_bytes, num_slots;
  at::IntArrayRef pids;
  int64_t spin;
  at::Tensor& stats;
};

int64_t ns_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
}

// Sends each rank its rows of `qkv` [sum(rows), q + 2 kv], stores and attends the root's own
// rows over its caches, then receives each rank's output rows into `out` [sum(rows), q].
void root_exchange(const RootExchange& ex, at::Tensor& out, const at::Tensor& qkv, int64_t heads, int64_t kv_heads,
                   int64_t d, double scale, at::Tensor& k_cache, at::Tensor& v_cache) {
  const int64_t world = static_cast<int64_t>(ex.rows.size());
  TORCH_CHECK(ex.send_channels.size() == ex.rows.size() && ex.recv_channels.size() == ex.rows.size() &&
                  ex.pids.size() == ex.rows.size(),
              "sgl_kernel: a TKNP root exchange has a channel each way and a pid per rank");
  TORCH_CHECK(ex.stats.scalar_type() == at::kLong && ex.stats.numel() == 2 && ex.stats.is_contiguous(),
              "sgl_kernel: a TKNP root exchange's stats are int64 [2]");
  int64_t total = 0;
  for (int64_t r : ex.rows) total += r;
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.stride(0) == qkv.size(1) && qkv.size(0) == total &&
                  qkv.size(1) == (heads + 2 * kv_heads) * d,
              "sgl_kernel: a TKNP root exchange's qkv is contiguous [sum(rows), (H + 2 Hkv) D]");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == total && out.size(1) == heads * d &&
                  out.scalar_type() == qkv.scalar_type(),
              "sgl_kernel: a TKNP root exchange's out is contiguous [sum(rows), H D] in qkv's dtype");
  const auto start = std::chrono::steady_clock::now();
  int64_t row = ex.rows[0];
  for (int64_t r = 1; r < world; ++r) {
    if (!ex.rows[r]) continue;
    shm_send(ex.segment, ex.send_channels[r], ex.slot_bytes, ex.num_slots, qkv.narrow(0, row, ex.rows[r]), ex.pids[r],
             ex.spin);
    row += ex.rows[r];
  }
  const auto own_start = std::chrono::steady_clock::now();
  if (ex.rows[0]) {
    at::Tensor own = out.narrow(0, 0, ex.rows[0]);
    on_threads(ex.threads, [&] {
      store_and_attend(own, qkv.narrow(0, 0, ex.rows[0]), heads, kv_heads, d, scale, k_cache, v_cache, ex.loc,
                       ex.req_to_token, ex.req_pool_indices, ex.seq_lens);
    });
  }
  const int64_t own_ns = ns_since(own_start);
  int64_t waited_ns = 0;
  row = ex.rows[0];
  for (int64_t r = 1; r < world; ++r) {
    if (!ex.rows[r]) continue;
    at::Tensor theirs = out.narrow(0, row, ex.rows[r]);
    waited_ns += shm_recv(ex.segment, ex.recv_channels[r], ex.slot_bytes, ex.num_slots, theirs, ex.pids[r], ex.spin);
    row += ex.rows[r];
  }
  int64_t* stats = ex.stats.data_ptr<int64_t>();
  stats[0] += waited_ns;
  stats[1] += ns_since(start) - own_ns;
}

// The root's attention of one decode layer (any layer: its q/k/v come from Python): see
// root_exchange.
void tknp_root_decode_attention(at::Tensor& out, const at::Tensor& qkv, at::IntArrayRef head_sizes, double scale,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& loc,
                                const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                                const at::Tensor& seq_lens, at::IntArrayRef rows, int64_t threads,
                                const at::Tensor& segment, at::IntArrayRef send_channels,
                                at::IntArrayRef recv_channels, int64_t slot_bytes, int64_t num_slots,
                                at::IntArrayRef pids, int64_t spin, at::Tensor& stats) {
  TORCH_CHECK(head_sizes.size() == 3, "sgl_kernel.tknp_root_decode_attention: heads, KV heads, head dim");
  const RootExchange ex{loc,           req_to_token,  req_pool_indices, seq_lens,  rows, threads, segment,
                        send_channels, recv_channels, slot_bytes,       num_slots, pids, spin,    stats};
  root_exchange(ex, out, qkv, head_sizes[0], head_sizes[1], head_sizes[2], scale, k_cache, v_cache);
}

// decode_layer on a TKNP root: the whole layer in one call, its attention through the exchange
// (the ranks attend their rows, the root its own), where the per-layer op above leaves the
// layer's two halves and the exchange to three calls and the Python between them.
at::Tensor tknp_root_decode_layer(at::Tensor& hidden, at::Tensor& residual, bool add_residual, at::TensorList weights,
                                  at::ArrayRef<c10::optional<at::Tensor>> biases, at::IntArrayRef sizes, double eps,
                                  double scale, const at::Tensor& positions, const at::Tensor& cos,
                                  const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                  const at::Tensor& loc, const at::Tensor& req_to_token,
                                  const at::Tensor& req_pool_indices, const at::Tensor& seq_lens,
                                  at::IntArrayRef rows, int64_t threads, const at::Tensor& segment,
                                  at::IntArrayRef send_channels, at::IntArrayRef recv_channels, int64_t slot_bytes,
                                  int64_t num_slots, at::IntArrayRef pids, int64_t spin, at::Tensor& stats) {
  const RootExchange ex{loc,           req_to_token,  req_pool_indices, seq_lens,  rows, threads, segment,
                        send_channels, recv_channels, slot_bytes,       num_slots, pids, spin,    stats};
  at::Tensor qkv = decode_layer_qkv(hidden, residual, add_residual, weights, biases, sizes, eps, positions, cos, sin);
  at::Tensor attn = at::empty({hidden.size(0), sizes[0] * sizes[2]}, qkv.options());
  root_exchange(ex, attn, qkv, sizes[0], sizes[1], sizes[2], scale, k_cache, v_cache);
  return decode_layer_out(attn, residual, weights, biases, sizes, eps);
}

// A rank, for every layer of a decode forward in turn: receives its [T, q + 2 kv] rows from the
// root, stores and attends them over layer i's caches, sends the output [T, q] back. Returns the
// ns spent waiting for the root's messages to start arriving.
int64_t tknp_rank_decode_layers(at::TensorList k_caches, at::TensorList v_caches, at::ArrayRef<double> scales,
                                at::IntArrayRef head_sizes, at::ScalarType dtype, const at::Tensor& loc,
                                const at::Tensor& req_to_token, const at::Tensor& req_pool_indices,
                                const at::Tensor& seq_lens, const at::Tensor& segment, int64_t recv_channel,
                                int64_t send_channel, int64_t slot_bytes, int64_t num_slots, int64_t root_pid,
                                int64_t spin) {
  TORCH_CHECK(head_sizes.size() == 3 && k_caches.size() == v_caches.size() && scales.size() == k_caches.size(),
              "sgl_kernel.tknp_rank_decode_layers: heads, KV heads, head dim; a scale and k/v cache per layer");
  const int64_t heads = head_sizes[0], kv_heads = head_sizes[1], d = head_sizes[2], t = loc.numel();
  const auto options = at::TensorOptions().dtype(dtype);
  // every layer's, in turn: a message is in the ring once shm_send returns
  at::Tensor qkv = at::empty({t, (heads + 2 * kv_heads) * d}, options);
  at::Tensor out = at::empty({t, heads * d}, options);
  int64_t waited_ns = 0;
  for (size_t i = 0; i < k_caches.size(); ++i) {
    waited_ns += shm_recv(segment, recv_channel, slot_bytes, num_slots, qkv, root_pid, spin);
    at::Tensor k_cache = k_caches[i], v_cache = v_caches[i];
    store_and_attend(out, qkv, heads, kv_heads, d, scales[i], k_cache, v_cache, loc, req_to_token, req_pool_indices,
                     seq_lens);
    shm_send(segment, send_channel, slot_bytes, num_slots, out, root_pid, spin);
  }
  return waited_ns;
}

}  // namespace

TORCH_LIBRARY(sgl_kernel, m) {
  m.def("isa() -> str", isa);
  m.def("supported_isas() -> str[]", supported_isas);
  m.def("set_isa(str name) -> ()", set_isa);
  m.def("parallel_threads() -> int", parallel_threads);
  m.def("attention_head_dims() -> int[]", [] { return std::vector<int64_t>(std::begin(kAttnHeadDims), std::end(kAttnHeadDims)); });
  m.def("rmsnorm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()", rmsnorm);
  m.def("fused_add_rmsnorm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()", fused_add_rmsnorm);
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()", rotary_embedding);
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()", silu_and_mul);
  m.def("argmax(Tensor logits) -> Tensor", argmax);
  m.def("store_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor loc, Tensor k, Tensor v) -> ()", store_kv);
  m.def("decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor req_to_token, "
        "Tensor req_pool_indices, Tensor seq_lens, float scale) -> ()",
        decode_attention);
  m.def("extend_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor req_to_token, "
        "Tensor req_pool_indices, Tensor seq_lens, Tensor extend_lens, Tensor q_start, float scale) -> ()",
        extend_attention);
  m.def("pack_linear_weight(Tensor weight) -> Tensor", pack_linear_weight);
  m.def("linear(Tensor x, Tensor packed_weight, Tensor? bias, int n, bool out_float) -> Tensor", linear);
  m.def("decode_layer(Tensor(a!) hidden, Tensor(b!) residual, bool add_residual, Tensor[] weights, Tensor?[] biases, "
        "int[] sizes, float eps, float scale, Tensor positions, Tensor cos, Tensor sin, Tensor(c!) k_cache, "
        "Tensor(d!) v_cache, Tensor loc, Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens) -> Tensor",
        decode_layer);
  m.def("decode_layer_qkv(Tensor(a!) hidden, Tensor(b!) residual, bool add_residual, Tensor[] weights, "
        "Tensor?[] biases, int[] sizes, float eps, Tensor positions, Tensor cos, Tensor sin) -> Tensor",
        decode_layer_qkv);
  m.def("decode_layer_out(Tensor attn, Tensor(a!) residual, Tensor[] weights, Tensor?[] biases, int[] sizes, "
        "float eps) -> Tensor",
        decode_layer_out);
  m.def("decode_layer_mlp(Tensor(a!) o, Tensor(b!) residual, Tensor[] weights, Tensor?[] biases, int[] sizes, "
        "float eps) -> Tensor",
        decode_layer_mlp);
  m.def("tknp_root_decode_attention(Tensor(a!) out, Tensor qkv, int[] head_sizes, float scale, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor loc, Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, int[] rows, "
        "int threads, Tensor segment, int[] send_channels, int[] recv_channels, int slot_bytes, int num_slots, "
        "int[] pids, int spin, Tensor(s!) stats) -> ()",
        tknp_root_decode_attention);
  m.def("tknp_root_decode_layer(Tensor(a!) hidden, Tensor(b!) residual, bool add_residual, Tensor[] weights, "
        "Tensor?[] biases, int[] sizes, float eps, float scale, Tensor positions, Tensor cos, Tensor sin, "
        "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor loc, Tensor req_to_token, Tensor req_pool_indices, "
        "Tensor seq_lens, int[] rows, int threads, Tensor segment, int[] send_channels, int[] recv_channels, "
        "int slot_bytes, int num_slots, int[] pids, int spin, Tensor(s!) stats) -> Tensor",
        tknp_root_decode_layer);
  m.def("tknp_rank_decode_layers(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, float[] scales, int[] head_sizes, "
        "ScalarType dtype, Tensor loc, Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, "
        "Tensor segment, int recv_channel, int send_channel, int slot_bytes, int num_slots, int root_pid, "
        "int spin) -> int",
        tknp_rank_decode_layers);
}

}  // namespace sgl_kernel
