// The CPU kernels, written once against VecF and compiled once per ISA (CMakeLists.txt builds
// this file with SGL_ISA = avx512_bf16, avx512, avx2 and generic, each with its own -m flags).
// Each kernel processes work items [begin, end); ops.cpp checks tensors and spreads the items
// over torch's threads.
#include <limits>
#include <type_traits>

#include "vec.h"

#ifndef SGL_ISA
#error "SGL_ISA names the instruction set this translation unit is compiled for"
#endif

namespace sgl_kernel {
namespace SGL_ISA {
namespace {

using V = VecF;
constexpr int W = V::W;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// dst[i] = src[i] converted, for n elements
template <typename S, typename T>
inline void convert_row(T* dst, const S* src, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) V::load(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = from_float<T>(to_float(src[i]));
}

// ---------------------------------------------------------------- RMSNorm

template <typename T>
void rmsnorm_rows(const RMSNormArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.hidden;
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const T* src = static_cast<const T*>(a.x) + r * a.x_stride;
    T* out = static_cast<T*>(a.out) + r * a.out_stride;
    if (a.residual) {
      // the sum is rounded to T once, stored as the new residual, and normalized as stored
      T* res = static_cast<T*>(a.residual) + r * a.residual_stride;
      int64_t i = 0;
      for (; i + W <= n; i += W) (V::load(src + i) + V::load(res + i)).store(res + i);
      for (; i < n; ++i) res[i] = from_float<T>(to_float(src[i]) + to_float(res[i]));
      src = res;
    }
    V acc = V::zero();
    float tail = 0.f;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      V x = V::load(src + i);
      acc = fmadd(x, x, acc);
    }
    for (; i < n; ++i) tail += to_float(src[i]) * to_float(src[i]);
    const float inv = 1.f / std::sqrt((acc.reduce_add() + tail) / float(n) + a.eps);
    // as Hugging Face's 16-bit models do: normalize in float32, round to T, then scale by weight
    const V vinv = V::set1(inv);
    for (i = 0; i + W <= n; i += W) (round_to_vec<T>(V::load(src + i) * vinv) * V::load(w + i)).store(out + i);
    for (; i < n; ++i) out[i] = from_float<T>(round_to<T>(to_float(src[i]) * inv) * to_float(w[i]));
  }
}

// ---------------------------------------------------------------- RoPE (neox halves)

template <typename T>
inline void rotate_head(T* x, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    V x1 = V::load(x + i), x2 = V::load(x + half + i), cc = V::load(c + i), ss = V::load(s + i);
    (x1 * cc - x2 * ss).store(x + i);
    fmadd(x1, ss, x2 * cc).store(x + half + i);
  }
  for (; i < half; ++i) {
    float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
    x[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
    x[half + i] = from_float<T>(x2 * c[i] + x1 * s[i]);
  }
}

template <typename T>
void rope_tokens(const RopeArgs& a, int64_t begin, int64_t end) {
  const int64_t half = a.head_dim / 2;
  for (int64_t t = begin; t < end; ++t) {
    const float* c = a.cos + a.positions[t] * half;
    const float* s = a.sin + a.positions[t] * half;
    T* q = static_cast<T*>(a.q) + t * a.q_stride_t;
    for (int64_t h = 0; h < a.num_q_heads; ++h) rotate_head(q + h * a.q_stride_h, c, s, half);
    T* k = static_cast<T*>(a.k) + t * a.k_stride_t;
    for (int64_t h = 0; h < a.num_k_heads; ++h) rotate_head(k + h * a.k_stride_h, c, s, half);
  }
}

// ---------------------------------------------------------------- SiLU and mul

template <typename T>
void silu_and_mul_rows(const SiluAndMulArgs& a, int64_t begin, int64_t end) {
  const int64_t n = a.width;
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = static_cast<const T*>(a.x) + r * a.x_stride;
    const T* up = gate + n;
    T* out = static_cast<T*>(a.out) + r * a.out_stride;
    int64_t i = 0;
    // silu rounded to T before the product, as torch's 16-bit silu(gate) * up computes it
    for (; i + W <= n; i += W) {
      V g = V::load(gate + i);
      V silu = round_to_vec<T>(g / (V::set1(1.f) + vexp(V::zero() - g)));
      (silu * V::load(up + i)).store(out + i);
    }
    for (; i < n; ++i) {
      float g = to_float(gate[i]);
      out[i] = from_float<T>(round_to<T>(g / (1.f + std::exp(-g))) * to_float(up[i]));
    }
  }
}

// ---------------------------------------------------------------- argmax

// Greedy sampling's argmax over the vocabulary: block maxima by vectors, the first block
// holding the row's maximum scanned for its first occurrence; torch.argmax's single-threaded
// pass took a millisecond a step at 32 rows of 49K logits. (x - x) summed over the row is NaN
// only when a NaN or an infinity is there, and only then is the row scanned for a NaN.
constexpr int64_t kArgmaxBlock = 256;

void argmax_rows(const ArgmaxArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.x + r * a.x_stride;
    float best = kNegInf;
    int64_t from = 0, idx = -1;  // the first block holding `best`; its index, once found
    V probe = V::zero();
    int64_t j = 0;
    for (; j + kArgmaxBlock <= a.n; j += kArgmaxBlock) {
      V m = V::load(x + j);
      probe = probe + (m - m);
      for (int64_t c = W; c < kArgmaxBlock; c += W) {
        const V v = V::load(x + j + c);
        m = vmax(m, v);
        probe = probe + (v - v);
      }
      const float block_max = m.reduce_max();
      if (block_max > best) {
        best = block_max;
        from = j;
      }
    }
    bool special = probe.reduce_add() != 0.f;  // NaN: some NaN or infinity in the blocks
    for (; j < a.n; ++j) {
      special |= !(x[j] - x[j] == 0.f);
      if (x[j] > best) {
        best = x[j];
        idx = j;
      }
    }
    if (idx < 0)
      for (idx = from; idx < lmin(a.n, from + kArgmaxBlock) - 1 && !(x[idx] == best); ++idx) {
      }
    if (special)
      for (int64_t t = 0; t < a.n; ++t)
        if (std::isnan(x[t])) {
          idx = t;
          break;
        }
    a.out[r] = idx;
  }
}

// ---------------------------------------------------------------- KV store

template <typename S, typename C>
void store_kv_tokens(const StoreKVArgs& a, int64_t begin, int64_t end) {
  const int64_t d = a.head_dim, row = a.num_kv_heads * d;
  for (int64_t t = begin; t < end; ++t) {
    C* kd = static_cast<C*>(a.k_cache) + a.loc[t] * row;
    C* vd = static_cast<C*>(a.v_cache) + a.loc[t] * row;
    const S* ks = static_cast<const S*>(a.k) + t * a.k_stride_t;
    const S* vs = static_cast<const S*>(a.v) + t * a.v_stride_t;
    for (int64_t h = 0; h < a.num_kv_heads; ++h) {
      convert_row(kd + h * d, ks + h * a.k_stride_h, d);
      convert_row(vd + h * d, vs + h * a.v_stride_h, d);
    }
  }
}

// ---------------------------------------------------------------- decode attention
//
// Work item (b, kv head, split): the query heads of that KV head, over the split's run of the
// request's tokens, with a float32 online softmax. K and V rows are read in place from the pool,
// a block of tokens at a time: each row is converted to float32 once, into a tile the group's
// query heads then share; scores come W tokens at a time, the W dot products reduced together
// (VecF::transpose_sum), and P.V runs two tokens at a time into two accumulators, so the FMA
// chains overlap. Work per token and head is then a few vector ops, and the kernel keeps up with
// what one core can read.

constexpr int kDecodeBlock = 32;  // tokens scored before a softmax update
constexpr int kPrefetchAhead = kDecodeBlock;  // tokens: the next block's rows, fetched while
                                              // this one computes (a request's slots need not be
                                              // adjacent, so the hardware prefetcher cannot follow
                                              // them; req_to_token can)

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + off);
}
constexpr int kMaxGroup = 8;  // query heads per pass (a larger GQA group takes several passes)

template <int D, typename TQ, typename TKV>
void decode_attention_items(const AttnArgs& a, int64_t begin, int64_t end) {
  static_assert(D % W == 0, "head_dim must be a multiple of the vector width");
  static_assert(kDecodeBlock % W == 0, "a block is whole vectors of scores");
  constexpr int DV = D / W;
  constexpr int U = DV <= 8 ? 2 : 1;  // P.V accumulators per head: as many as the registers hold
  const int64_t hkv = a.num_kv_heads, group = a.num_heads / hkv, splits = a.num_splits;
  const int64_t kv_row = hkv * D;
  const TKV* kc = static_cast<const TKV*>(a.k_cache);
  const TKV* vc = static_cast<const TKV*>(a.v_cache);
  alignas(64) float q[kMaxGroup][D];
  alignas(64) float acc[kMaxGroup][D];
  alignas(64) float score[kMaxGroup][kDecodeBlock];
  alignas(64) float kt[kDecodeBlock][D];  // the block's K rows in float32; rows past its end are 0
  alignas(64) float vt[kDecodeBlock][D];  // its V rows
  float mx[kMaxGroup], sum[kMaxGroup];

  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / (hkv * splits), h = (item / splits) % hkv, s = item % splits;
    const int64_t len = a.seq_lens[b];
    const int64_t t0 = lmin(len, s * a.split_len), t1 = lmin(len, t0 + a.split_len);
    const int64_t* slots = a.req_to_token + a.req_pool_indices[b] * a.req_to_token_stride;
    for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
      const int64_t gn = lmin(kMaxGroup, group - g0);
      const int64_t head0 = h * group + g0;
      for (int64_t g = 0; g < gn; ++g) {
        const TQ* qr = static_cast<const TQ*>(a.q) + b * a.q_stride_t + (head0 + g) * a.q_stride_h;
        for (int c = 0; c < DV; ++c) (V::load(qr + c * W) * V::set1(a.scale)).store(q[g] + c * W);
        for (int c = 0; c < DV; ++c) V::zero().store(acc[g] + c * W);
        mx[g] = kNegInf;
        sum[g] = 0.f;
      }
      for (int64_t j0 = t0; j0 < t1; j0 += kDecodeBlock) {
        const int64_t jn = lmin(kDecodeBlock, t1 - j0);
        const int64_t jw = (jn + W - 1) / W * W;  // scored in whole vectors
        for (int64_t j = 0; j < jn; ++j) {
          if (j0 + j + kPrefetchAhead < t1) {
            const int64_t ahead = slots[j0 + j + kPrefetchAhead] * kv_row + h * D;
            prefetch_row(kc + ahead, D);
            prefetch_row(vc + ahead, D);
          }
          const int64_t row = slots[j0 + j] * kv_row + h * D;
          for (int c = 0; c < DV; ++c) V::load(kc + row + c * W).store(kt[j] + c * W);
          for (int c = 0; c < DV; ++c) V::load(vc + row + c * W).store(vt[j] + c * W);
        }
        for (int64_t j = jn; j < jw; ++j)
          for (int c = 0; c < DV; ++c) V::zero().store(kt[j] + c * W);
        for (int64_t g = 0; g < gn; ++g) {
          for (int64_t jc = 0; jc < jw; jc += W) {
            V dots[W];
            for (int t = 0; t < W; ++t) {
              V dot = V::load(q[g]) * V::load(kt[jc + t]);
              for (int c = 1; c < DV; ++c) dot = fmadd(V::load(q[g] + c * W), V::load(kt[jc + t] + c * W), dot);
              dots[t] = dot;
            }
            V::transpose_sum(dots).store(score[g] + jc);
          }
          // online softmax over the block's jn scores (those past jn are padding)
          const int64_t jv = jn - jn % W;
          V vmx = V::set1(kNegInf);
          for (int64_t j = 0; j < jv; j += W) vmx = vmax(vmx, V::load(score[g] + j));
          float block_max = vmx.reduce_max();
          for (int64_t j = jv; j < jn; ++j) block_max = fmax_(block_max, score[g][j]);
          const float new_max = fmax_(mx[g], block_max);
          const float alpha = std::exp(mx[g] - new_max);
          V vsum = V::zero();
          for (int64_t j = 0; j < jv; j += W) {
            const V p = vexp(V::load(score[g] + j) - V::set1(new_max));
            p.store(score[g] + j);
            vsum = vsum + p;
          }
          float block_sum = vsum.reduce_add();
          for (int64_t j = jv; j < jn; ++j) block_sum += score[g][j] = std::exp(score[g][j] - new_max);
          sum[g] = sum[g] * alpha + block_sum;
          mx[g] = new_max;
          // acc = acc * alpha + P.V, U tokens at a time into U accumulators
          V o[U][DV];
          for (int c = 0; c < DV; ++c) o[0][c] = V::load(acc[g] + c * W) * V::set1(alpha);
          for (int u = 1; u < U; ++u)
            for (int c = 0; c < DV; ++c) o[u][c] = V::zero();
          int64_t j = 0;
          for (; j + U <= jn; j += U)
            for (int u = 0; u < U; ++u) {
              const V p = V::set1(score[g][j + u]);
              for (int c = 0; c < DV; ++c) o[u][c] = fmadd(p, V::load(vt[j + u] + c * W), o[u][c]);
            }
          for (; j < jn; ++j) {
            const V p = V::set1(score[g][j]);
            for (int c = 0; c < DV; ++c) o[0][c] = fmadd(p, V::load(vt[j] + c * W), o[0][c]);
          }
          for (int u = 1; u < U; ++u)
            for (int c = 0; c < DV; ++c) o[0][c] = o[0][c] + o[u][c];
          for (int c = 0; c < DV; ++c) o[0][c].store(acc[g] + c * W);
        }
      }
      for (int64_t g = 0; g < gn; ++g) {
        if (splits == 1) {
          TQ* o = static_cast<TQ*>(a.out) + b * a.out_stride_t + (head0 + g) * a.out_stride_h;
          const V inv = V::set1(1.f / sum[g]);
          for (int c = 0; c < DV; ++c) (V::load(acc[g] + c * W) * inv).store(o + c * W);
        } else {
          float* part = a.partials + (((b * hkv + h) * splits + s) * group + g0 + g) * (D + 2);
          for (int c = 0; c < DV; ++c) V::load(acc[g] + c * W).store(part + c * W);
          part[D] = mx[g];
          part[D + 1] = sum[g];
        }
      }
    }
  }
}

// Work item (b, head): merges the head's splits by their log-sum-exp.
template <int D, typename TQ>
void decode_merge_items(const AttnArgs& a, int64_t begin, int64_t end) {
  constexpr int DV = D / W;
  const int64_t hkv = a.num_kv_heads, group = a.num_heads / hkv, splits = a.num_splits;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / a.num_heads, head = item % a.num_heads;
    const int64_t h = head / group, g = head % group;
    auto part = [&](int64_t s) { return a.partials + (((b * hkv + h) * splits + s) * group + g) * (D + 2); };
    float m = kNegInf;
    for (int64_t s = 0; s < splits; ++s) m = fmax_(m, part(s)[D]);
    V o[DV];
    for (int c = 0; c < DV; ++c) o[c] = V::zero();
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const float* p = part(s);
      if (p[D + 1] == 0.f) continue;  // an empty split (past the request's end)
      const float w = std::exp(p[D] - m);
      total += p[D + 1] * w;
      for (int c = 0; c < DV; ++c) o[c] = fmadd(V::load(p + c * W), V::set1(w), o[c]);
    }
    TQ* out = static_cast<TQ*>(a.out) + b * a.out_stride_t + head * a.out_stride_h;
    const V inv = V::set1(1.f / total);
    for (int c = 0; c < DV; ++c) (o[c] * inv).store(out + c * W);
  }
}

// ---------------------------------------------------------------- extend (prefill) attention
//
// Work item: up to kExtendBlockM query rows of one request, for every query head of one KV
// head. Keys come in blocks of BN, converted to float32 once per item (K transposed, so a
// query row's scores are BN/W vector FMAs per head dim element); causal, after the prefix.

// Keys of the block [n0, n0 + nn) that each of the rb (<= RB) query rows starting at position
// `pos0` sees under the causal mask (0 for rows past rb); returns the most any row sees.
template <int RB>
inline int64_t visible_keys(int64_t (&visible)[RB], int64_t rb, int64_t pos0, int64_t n0, int64_t nn) {
  int64_t most = 0;
  for (int r = 0; r < RB; ++r) {
    visible[r] = r < rb ? lmax(0, lmin(nn, pos0 + r + 1 - n0)) : 0;
    most = lmax(most, visible[r]);
  }
  return most;
}

// One query row's online-softmax step over a block of BNV * W keys: `s` holds its scaled
// scores, the first `visible` of them real. Writes the probabilities, rounded to T (and summed
// as rounded, so the sum normalizes exactly what the P x V product uses), to `p`, zero past
// `visible`; updates the row's running max and sum; returns the factor the row's output so far
// is rescaled by; `scratch` (BN floats; may be `p` itself when T is float) holds the scores of
// a partial block. A row that sees no key keeps its state and contributes nothing. Partial
// (diagonal) blocks mask in memory and stay on vectors: the scalar max and sum over the visible
// keys they used to take, each a chain of dependent adds, cost more than a whole block.
template <int BNV, typename T>
inline float softmax_block(const V (&s)[BNV], int64_t visible, float& mx, float& sum, T* p, float* scratch) {
  constexpr int BN = BNV * W;
  if (visible == 0) {
    for (int64_t j = 0; j < BN; ++j) p[j] = from_float<T>(0.f);
    return 1.f;
  }
  V m = s[0];
  if (visible == BN) {
    for (int c = 1; c < BNV; ++c) m = vmax(m, s[c]);
  } else {
    for (int c = 0; c < BNV; ++c) s[c].store(scratch + c * W);
    for (int64_t j = visible; j < BN; ++j) scratch[j] = kNegInf;
    m = V::load(scratch);
    for (int c = 1; c < BNV; ++c) m = vmax(m, V::load(scratch + c * W));
  }
  const float new_max = fmax_(mx, m.reduce_max());
  const float alpha = std::exp(mx - new_max);
  V total = V::zero();
  for (int c = 0; c < BNV; ++c) {
    const V e = round_to_vec<T>(vexp(s[c] - V::set1(new_max)));
    e.store(p + c * W);
    total = total + e;
  }
  if (visible < BN) {
    for (int64_t j = visible; j < BN; ++j) p[j] = from_float<T>(0.f);  // masked keys weigh nothing
    total = V::load(p);
    for (int c = 1; c < BNV; ++c) total = total + V::load(p + c * W);
  }
  sum = sum * alpha + total.reduce_add();
  mx = new_max;
  return alpha;
}

template <int D, typename TQ, typename TKV>
void extend_attention_items(const AttnArgs& a, const ExtendItem* items, int64_t begin, int64_t end) {
  static_assert(D % W == 0, "head_dim must be a multiple of the vector width");
  constexpr int DV = D / W;
  constexpr int BN = 4 * W;
  constexpr int BNV = BN / W;
  constexpr int64_t BM = kExtendBlockM;
  constexpr int RB = 4;  // query rows scored together
  constexpr int RP = DV > 8 ? 1 : DV > 4 ? 2 : 4;  // rows accumulated together (<= 16 accumulators)
  static_assert(RB % RP == 0, "row blocks split evenly");
  const int64_t hkv = a.num_kv_heads, group = a.num_heads / hkv;
  const int64_t kv_row = hkv * D;
  const TKV* kc = static_cast<const TKV*>(a.k_cache);
  const TKV* vc = static_cast<const TKV*>(a.v_cache);
  // rows of the item: query head g, row i at g * BM + i
  float* qf = new float[group * BM * D];
  float* of = new float[group * BM * D];
  float* mx = new float[group * BM];
  float* sum = new float[group * BM];
  alignas(64) float kt[D * BN];  // [D][BN]
  alignas(64) float vf[BN * D];  // [BN][D]
  alignas(64) float sc[RB * BN];  // [RB][BN]

  for (int64_t it = begin; it < end; ++it) {
    const ExtendItem& item = items[it];
    const int64_t b = item.req, h = item.kv_head, r0 = item.row_begin, nrows = item.row_end - item.row_begin;
    const int64_t prefix = a.seq_lens[b] - a.extend_lens[b];
    const int64_t q_row0 = a.q_start[b] + r0;
    const int64_t* slots = a.req_to_token + a.req_pool_indices[b] * a.req_to_token_stride;
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i = 0; i < nrows; ++i) {
        const TQ* qr = static_cast<const TQ*>(a.q) + (q_row0 + i) * a.q_stride_t + (h * group + g) * a.q_stride_h;
        float* dst = qf + (g * BM + i) * D;
        for (int c = 0; c < DV; ++c) (V::load(qr + c * W) * V::set1(a.scale)).store(dst + c * W);
        for (int c = 0; c < DV; ++c) V::zero().store(of + (g * BM + i) * D + c * W);
        mx[g * BM + i] = kNegInf;
        sum[g * BM + i] = 0.f;
      }
    }
    const int64_t key_end = prefix + r0 + nrows;  // the last row sees keys [0, key_end)
    for (int64_t n0 = 0; n0 < key_end; n0 += BN) {
      const int64_t nn = lmin(BN, key_end - n0);
      for (int64_t j = 0; j < BN; ++j) {
        if (j < nn) {
          const TKV* kr = kc + slots[n0 + j] * kv_row + h * D;
          const TKV* vr = vc + slots[n0 + j] * kv_row + h * D;
          for (int64_t d = 0; d < D; ++d) kt[d * BN + j] = to_float(kr[d]);
          for (int c = 0; c < DV; ++c) V::load(vr + c * W).store(vf + j * D + c * W);
        } else {
          for (int64_t d = 0; d < D; ++d) kt[d * BN + j] = 0.f;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        // RB query rows at a time: each K element loaded feeds RB rows' scores, each V element
        // RP rows' outputs (as many as 16 accumulators allow)
        for (int64_t i0 = 0; i0 < nrows; i0 += RB) {
          const int64_t rb = lmin(RB, nrows - i0);
          int64_t visible[RB];
          const int64_t most = visible_keys(visible, rb, prefix + r0 + i0, n0, nn);
          if (most == 0) continue;
          const int64_t row0 = g * BM + i0;
          V s[RB][BNV];
          for (int r = 0; r < RB; ++r)
            for (int c = 0; c < BNV; ++c) s[r][c] = V::zero();
          for (int64_t d = 0; d < D; ++d) {
            V k[BNV];
            for (int c = 0; c < BNV; ++c) k[c] = V::load(kt + d * BN + c * W);
            for (int r = 0; r < RB; ++r) {
              const V qd = V::set1(qf[(row0 + lmin(r, rb - 1)) * D + d]);
              for (int c = 0; c < BNV; ++c) s[r][c] = fmadd(qd, k[c], s[r][c]);
            }
          }
          float alpha[RB];
          for (int r = 0; r < RB; ++r) alpha[r] = softmax_block(s[r], visible[r], mx[row0 + r], sum[row0 + r], sc + r * BN, sc + r * BN);
          for (int rp0 = 0; rp0 < RB; rp0 += RP) {
            V o[RP][DV];
            for (int r = 0; r < RP; ++r) {
              const float* orow = of + (row0 + lmin(rp0 + r, rb - 1)) * D;
              for (int c = 0; c < DV; ++c) o[r][c] = V::load(orow + c * W) * V::set1(alpha[rp0 + r]);
            }
            for (int64_t j = 0; j < most; ++j) {
              V v[DV];
              for (int c = 0; c < DV; ++c) v[c] = V::load(vf + j * D + c * W);
              for (int r = 0; r < RP; ++r) {
                const V p = V::set1(sc[(rp0 + r) * BN + j]);
                for (int c = 0; c < DV; ++c) o[r][c] = fmadd(p, v[c], o[r][c]);
              }
            }
            for (int r = 0; r < RP && rp0 + r < rb; ++r)
              for (int c = 0; c < DV; ++c) o[r][c].store(of + (row0 + rp0 + r) * D + c * W);
          }
        }
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i = 0; i < nrows; ++i) {
        TQ* o = static_cast<TQ*>(a.out) + (q_row0 + i) * a.out_stride_t + (h * group + g) * a.out_stride_h;
        const V inv = V::set1(1.f / sum[g * BM + i]);
        for (int c = 0; c < DV; ++c) (V::load(of + (g * BM + i) * D + c * W) * inv).store(o + c * W);
      }
    }
  }
  delete[] qf;
  delete[] of;
  delete[] mx;
  delete[] sum;
}

// The same work with bf16 dot products (AVX512-BF16, bf16 queries over a bf16 cache): scores
// from q and K pairs along the head dim, outputs from probabilities (rounded to bf16, as the
// sums that normalize them are) and V pairs along the keys; softmax state in float32.
#if defined(__AVX512BF16__)
// 16 x 16 32-bit elements: rows r[i] in, columns out (r[i] becomes element i of every vector).
inline void transpose16x16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // each 128-bit lane now holds a 4 x 4 tile in place; gather the lanes across the rows
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// The block's keys (the first nn of BN; zero past them) as kp[p][j] = key j's pair p along the
// head dim: 16 x 16 transposes of 32-bit pairs (the element-wise copy took a sixth of the
// kernel's time at 8 x 1024 tokens).
template <int D, int BN>
inline void pack_keys_bf16(uint32_t* kp, const bf16* kc, const int64_t* slots, int64_t nn, int64_t kv_row, int64_t h) {
  for (int j0 = 0; j0 < BN; j0 += 16) {
    const bf16* rows[16];
    for (int i = 0; i < 16; ++i) rows[i] = j0 + i < nn ? kc + slots[j0 + i] * kv_row + h * D : nullptr;
    for (int p0 = 0; p0 < D / 2; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = rows[i] ? _mm512_loadu_si512(rows[i] + 2 * p0) : _mm512_setzero_si512();
      transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_si512(kp + (p0 + i) * BN + j0, r[i]);
    }
  }
}

// The block's values as vp[i][d] = (value 2i, value 2i + 1) of dim d, zero past the first nn.
template <int D, int BN>
inline void pack_values_bf16(uint32_t* vp, const bf16* vc, const int64_t* slots, int64_t nn, int64_t kv_row, int64_t h) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int i = 0; i < BN / 2; ++i) {
    const bf16* v0 = 2 * i < nn ? vc + slots[2 * i] * kv_row + h * D : nullptr;
    const bf16* v1 = 2 * i + 1 < nn ? vc + slots[2 * i + 1] * kv_row + h * D : nullptr;
    for (int d0 = 0; d0 < D; d0 += 32) {
      const __m512i a = v0 ? _mm512_loadu_si512(v0 + d0) : _mm512_setzero_si512();
      const __m512i b = v1 ? _mm512_loadu_si512(v1 + d0) : _mm512_setzero_si512();
      _mm512_store_si512(vp + i * D + d0, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_store_si512(vp + i * D + d0 + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

template <int D>
void extend_attention_items_bf16(const AttnArgs& a, const ExtendItem* items, int64_t begin, int64_t end) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  constexpr int BN = 64;  // keys per block: four vectors of 16 scores
  constexpr int BNV = BN / 16;
  constexpr int DV = D / 16;
  constexpr int DP = D / 2;  // pairs along the head dim
  constexpr int64_t BM = kExtendBlockM;
  constexpr int RB = 4;
  constexpr int RP = DV > 8 ? 1 : DV > 4 ? 2 : 4;
  const int64_t hkv = a.num_kv_heads, group = a.num_heads / hkv, kv_row = hkv * D;
  const bf16* kc = static_cast<const bf16*>(a.k_cache);
  const bf16* vc = static_cast<const bf16*>(a.v_cache);
  alignas(64) uint32_t kp[DP * BN];  // [D / 2][BN]: key j's pair p at [p][j]
  alignas(64) uint32_t vp[(BN / 2) * D];  // [BN / 2][D]: keys 2i, 2i + 1 of dim d at [i][d]
  alignas(64) float sc[BN];
  alignas(64) bf16 pb[RB * BN];  // probabilities, [RB][BN]
  float* of = new float[group * BM * D];
  float* mx = new float[group * BM];
  float* sum = new float[group * BM];
  const __m512 vscale = _mm512_set1_ps(a.scale);

  for (int64_t it = begin; it < end; ++it) {
    const ExtendItem& item = items[it];
    const int64_t b = item.req, h = item.kv_head, r0 = item.row_begin, nrows = item.row_end - item.row_begin;
    const int64_t prefix = a.seq_lens[b] - a.extend_lens[b];
    const int64_t q_row0 = a.q_start[b] + r0;
    const int64_t* slots = a.req_to_token + a.req_pool_indices[b] * a.req_to_token_stride;
    for (int64_t r = 0; r < group * BM; ++r) {
      for (int c = 0; c < DV; ++c) _mm512_storeu_ps(of + r * D + c * 16, _mm512_setzero_ps());
      mx[r] = kNegInf;
      sum[r] = 0.f;
    }
    const int64_t key_end = prefix + r0 + nrows;
    for (int64_t n0 = 0; n0 < key_end; n0 += BN) {
      const int64_t nn = lmin(BN, key_end - n0);
      pack_keys_bf16<D, BN>(kp, kc, slots + n0, nn, kv_row, h);
      pack_values_bf16<D, BN>(vp, vc, slots + n0, nn, kv_row, h);
      // the next block's rows, scattered over the pool, arrive while this one is computed
      for (int64_t j = n0 + BN; j < lmin(key_end, n0 + 2 * BN); ++j) {
        prefetch_row(kc + slots[j] * kv_row + h * D, D);
        prefetch_row(vc + slots[j] * kv_row + h * D, D);
      }
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i0 = 0; i0 < nrows; i0 += RB) {
          const int64_t rb = lmin(RB, nrows - i0);
          int64_t visible[RB];
          const int64_t most = visible_keys(visible, rb, prefix + r0 + i0, n0, nn);
          if (most == 0) continue;
          const int64_t row0 = g * BM + i0;
          const uint32_t* qr[RB];
          for (int r = 0; r < RB; ++r)
            qr[r] = reinterpret_cast<const uint32_t*>(static_cast<const bf16*>(a.q) + (q_row0 + i0 + lmin(r, rb - 1)) * a.q_stride_t +
                                                      (h * group + g) * a.q_stride_h);
          __m512 s[RB][BNV];
          for (int r = 0; r < RB; ++r)
            for (int c = 0; c < BNV; ++c) s[r][c] = _mm512_setzero_ps();
          for (int64_t p = 0; p < DP; ++p) {
            __m512bh k[BNV];
            for (int c = 0; c < BNV; ++c) k[c] = (__m512bh)_mm512_load_si512(kp + p * BN + c * 16);
            for (int r = 0; r < RB; ++r) {
              const __m512bh qb = (__m512bh)_mm512_set1_epi32(int32_t(qr[r][p]));
              for (int c = 0; c < BNV; ++c) s[r][c] = _mm512_dpbf16_ps(s[r][c], qb, k[c]);
            }
          }
          float alpha[RB];
          for (int r = 0; r < RB; ++r) {
            V scaled[BNV];
            for (int c = 0; c < BNV; ++c) scaled[c] = V{_mm512_mul_ps(s[r][c], vscale)};
            alpha[r] = softmax_block(scaled, visible[r], mx[row0 + r], sum[row0 + r], pb + r * BN, sc);
          }
          for (int rp0 = 0; rp0 < RB; rp0 += RP) {
            __m512 o[RP][DV];
            for (int r = 0; r < RP; ++r) {
              const float* orow = of + (row0 + lmin(rp0 + r, rb - 1)) * D;
              const __m512 al = _mm512_set1_ps(alpha[rp0 + r]);
              for (int c = 0; c < DV; ++c) o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(orow + c * 16), al);
            }
            for (int64_t i = 0; i < (most + 1) / 2; ++i) {
              __m512bh v[DV];
              for (int c = 0; c < DV; ++c) v[c] = (__m512bh)_mm512_load_si512(vp + i * D + c * 16);
              for (int r = 0; r < RP; ++r) {
                const __m512bh pp = (__m512bh)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(pb + (rp0 + r) * BN)[i]);
                for (int c = 0; c < DV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], pp, v[c]);
              }
            }
            for (int r = 0; r < RP && rp0 + r < rb; ++r)
              for (int c = 0; c < DV; ++c) _mm512_storeu_ps(of + (row0 + rp0 + r) * D + c * 16, o[r][c]);
          }
        }
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i = 0; i < nrows; ++i) {
        bf16* o = static_cast<bf16*>(a.out) + (q_row0 + i) * a.out_stride_t + (h * group + g) * a.out_stride_h;
        const V inv = V::set1(1.f / sum[g * BM + i]);
        for (int c = 0; c < DV; ++c) (V::load(of + (g * BM + i) * D + c * 16) * inv).store(o + c * 16);
      }
    }
  }
  delete[] of;
  delete[] mx;
  delete[] sum;
}
#endif

// ---------------------------------------------------------------- bf16 linear

// Both forms below walk blocks one after another, so a thread reads its weights as one
// contiguous stream: interleaving four blocks' streams, as the first version did, left a single
// row's GEMV at 29-31 GB/s of the machine's 38-40, and two blocks at a time (half the broadcasts
// per dot product, faster with the weights in cache) lost more to the stream than it gained from
// 8 to 32 rows with the weights cold, as a decode step reads them. One or two rows go at the
// pace of memory and the hardware prefetcher keeps up alone; more rows compute longer per
// weight, and only a prefetch into L2 8 KB ahead kept the stream from stalling behind them (8
// rows of the 3072 x 576 gate_up, cold: 185 -> 95 us; AVX512-BF16, Zen 4).
constexpr int64_t kLinearPrefetchL2 = 4096;  // elements

#if defined(__AVX512BF16__)

// Rows [m0, m0 + MR) of output block nb: each pair of bf16 weights loaded feeds MR dot
// products; U accumulators per row over consecutive k pairs cover the dot products' latency
// where MR rows alone do not.
template <int MR, int U>
inline void linear_block_rows(const LinearArgs& a, int64_t m0, int64_t nb) {
  const int64_t k2n = a.k / 2;
  const int32_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = reinterpret_cast<const int32_t*>(a.x + (m0 + m) * a.x_stride);
  const bf16* wb = a.packed_w + nb * kLinearBlockN * a.k;
  __m512 acc[MR][U];
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  auto step = [&](int64_t k2, int u) {
    const bf16* wp = wb + k2 * 2 * kLinearBlockN;
    if constexpr (MR > 2) __builtin_prefetch(wp + kLinearPrefetchL2, 0, 2);  // into L2
    const __m512bh w = (__m512bh)_mm512_loadu_si512(wp);
    for (int m = 0; m < MR; ++m) acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_set1_epi32(xr[m][k2]), w);
  };
  int64_t k2 = 0;
  for (; k2 + U <= k2n; k2 += U)
    for (int u = 0; u < U; ++u) step(k2 + u, u);
  for (; k2 < k2n; ++k2) step(k2, 0);
  const int64_t n = nb * kLinearBlockN;
  const __m512 bias = a.bias ? _mm512_loadu_ps(a.bias + n) : _mm512_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    __m512 y = bias;
    for (int u = 0; u < U; ++u) y = _mm512_add_ps(y, acc[m][u]);
    if (a.out_dtype == DType::kBFloat16)
      V{y}.store(static_cast<bf16*>(a.out) + (m0 + m) * a.out_stride + n);
    else
      V{y}.store(static_cast<float*>(a.out) + (m0 + m) * a.out_stride + n);
  }
}

// Work item i: output blocks [i * B, (i + 1) * B) of 16 outputs, B = a.blocks_per_item (ops.cpp
// picks 2 to 4 so that the items split evenly over the threads), block by block, each block's
// rows in chunks of 8 (the chunks after the first find the block's weights in cache).
void linear(const LinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t nb = begin * a.blocks_per_item; nb < lmin(a.n / kLinearBlockN, end * a.blocks_per_item); ++nb) {
    int64_t m0 = 0;
    for (; m0 + 8 <= a.m; m0 += 8) linear_block_rows<8, 2>(a, m0, nb);
    switch (a.m - m0) {
      case 7: linear_block_rows<7, 2>(a, m0, nb); break;
      case 6: linear_block_rows<6, 2>(a, m0, nb); break;
      case 5: linear_block_rows<5, 2>(a, m0, nb); break;
      case 4: linear_block_rows<4, 2>(a, m0, nb); break;
      case 3: linear_block_rows<3, 2>(a, m0, nb); break;
      case 2: linear_block_rows<2, 4>(a, m0, nb); break;
      case 1: linear_block_rows<1, 4>(a, m0, nb); break;
      default: break;
    }
  }
}

#else

// Without bf16 dot products: each pair of packed weights is widened to float32 by a shift (the
// even k) and a mask (the odd k), and multiplied into float32 accumulators with FMAs against x
// already in float32 (the binding converts it once, a.x32). The weights stream as above; MR rows
// per pass share each widened weight vector. torch's own bf16 matmul has no such path where
// oneDNN does not take bf16 (AVX2): a plain loop, 3-7x slower than its float32 matmul.
constexpr int kLinearVecs = kLinearBlockN / W;  // vectors per block of 16 outputs
// AVX2: 5 x 2 accumulators, 4 widened weight vectors, a broadcast and the mask fill its 16 registers
constexpr int kLinearRows = W >= 16 ? 8 : 5;

template <int MR>
inline void linear_block_rows_fma(const LinearArgs& a, int64_t m0, int64_t nb) {
  const int64_t k2n = a.k / 2;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x32 + (m0 + m) * a.x32_stride;
  const bf16* wb = a.packed_w + nb * kLinearBlockN * a.k;
  V acc[MR][kLinearVecs];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kLinearVecs; ++j) acc[m][j] = V::zero();
  for (int64_t k2 = 0; k2 < k2n; ++k2) {
    const bf16* wp = wb + k2 * 2 * kLinearBlockN;
    if constexpr (MR > 2) __builtin_prefetch(wp + kLinearPrefetchL2, 0, 2);  // into L2
    V even[kLinearVecs], odd[kLinearVecs];
    for (int j = 0; j < kLinearVecs; ++j) V::load_bf16_pairs(wp + j * 2 * W, even[j], odd[j]);
    // row by row, so that each broadcast is live for its own FMAs only (AVX2 has 16 registers)
    for (int m = 0; m < MR; ++m) {
      const V xe = V::set1(xr[m][2 * k2]);
      for (int j = 0; j < kLinearVecs; ++j) acc[m][j] = fmadd(xe, even[j], acc[m][j]);
      const V xo = V::set1(xr[m][2 * k2 + 1]);
      for (int j = 0; j < kLinearVecs; ++j) acc[m][j] = fmadd(xo, odd[j], acc[m][j]);
    }
  }
  const int64_t n = nb * kLinearBlockN;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < kLinearVecs; ++j) {
      V y = a.bias ? acc[m][j] + V::load(a.bias + n + j * W) : acc[m][j];
      if (a.out_dtype == DType::kBFloat16)
        y.store(static_cast<bf16*>(a.out) + (m0 + m) * a.out_stride + n + j * W);
      else
        y.store(static_cast<float*>(a.out) + (m0 + m) * a.out_stride + n + j * W);
    }
}

template <int MR>
inline void linear_block_tail(const LinearArgs& a, int64_t m0, int64_t nb, int64_t rows) {
  if constexpr (MR > 0) {
    if (rows == MR) return linear_block_rows_fma<MR>(a, m0, nb);
    linear_block_tail<MR - 1>(a, m0, nb, rows);
  }
}

// As the AVX512-BF16 linear: items of blocks, each block's rows kLinearRows at a time.
void linear(const LinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t nb = begin * a.blocks_per_item; nb < lmin(a.n / kLinearBlockN, end * a.blocks_per_item); ++nb) {
    int64_t m0 = 0;
    for (; m0 + kLinearRows <= a.m; m0 += kLinearRows) linear_block_rows_fma<kLinearRows>(a, m0, nb);
    linear_block_tail<kLinearRows - 1>(a, m0, nb, a.m - m0);
  }
}

#endif

// ---------------------------------------------------------------- dtype and head_dim dispatch

void rmsnorm(const RMSNormArgs& a, int64_t b, int64_t e) {
  a.dtype == DType::kBFloat16 ? rmsnorm_rows<bf16>(a, b, e) : rmsnorm_rows<float>(a, b, e);
}
void rope(const RopeArgs& a, int64_t b, int64_t e) {
  a.dtype == DType::kBFloat16 ? rope_tokens<bf16>(a, b, e) : rope_tokens<float>(a, b, e);
}
void silu_and_mul(const SiluAndMulArgs& a, int64_t b, int64_t e) {
  a.dtype == DType::kBFloat16 ? silu_and_mul_rows<bf16>(a, b, e) : silu_and_mul_rows<float>(a, b, e);
}
void store_kv(const StoreKVArgs& a, int64_t b, int64_t e) {
  const bool src16 = a.src_dtype == DType::kBFloat16, cache16 = a.cache_dtype == DType::kBFloat16;
  if (src16 && cache16) store_kv_tokens<bf16, bf16>(a, b, e);
  else if (src16) store_kv_tokens<bf16, float>(a, b, e);
  else if (cache16) store_kv_tokens<float, bf16>(a, b, e);
  else store_kv_tokens<float, float>(a, b, e);
}

// Calls f.template operator()<D, TQ, TKV>() for the (head_dim, q dtype, KV dtype) of `a`; the
// bindings accept only these combinations: D in kAttnHeadDims; q and KV both float32, both bf16,
// or float32 queries over a bf16 cache (16-bit models computed in float32).
template <int D, typename F>
void dispatch_attn_dtypes(const AttnArgs& a, F&& f) {
  if (a.q_dtype == DType::kBFloat16) f.template operator()<D, bf16, bf16>();
  else if (a.kv_dtype == DType::kBFloat16) f.template operator()<D, float, bf16>();
  else f.template operator()<D, float, float>();
}

template <typename F>
void dispatch_attn(const AttnArgs& a, F&& f) {
  switch (a.head_dim) {
    case 16: return dispatch_attn_dtypes<16>(a, f);
    case 32: return dispatch_attn_dtypes<32>(a, f);
    case 64: return dispatch_attn_dtypes<64>(a, f);
    case 80: return dispatch_attn_dtypes<80>(a, f);
    case 96: return dispatch_attn_dtypes<96>(a, f);
    case 128: return dispatch_attn_dtypes<128>(a, f);
    case 256: return dispatch_attn_dtypes<256>(a, f);
    default: break;  // the bindings refuse other head dims
  }
}

void decode_attention(const AttnArgs& a, int64_t b, int64_t e) {
  dispatch_attn(a, [&]<int D, typename TQ, typename TKV>() { decode_attention_items<D, TQ, TKV>(a, b, e); });
}
void decode_merge(const AttnArgs& a, int64_t b, int64_t e) {
  dispatch_attn(a, [&]<int D, typename TQ, typename TKV>() { decode_merge_items<D, TQ>(a, b, e); });
}
void extend_attention(const AttnArgs& a, const ExtendItem* items, int64_t b, int64_t e) {
  dispatch_attn(a, [&]<int D, typename TQ, typename TKV>() {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<TQ, bf16> && std::is_same_v<TKV, bf16> && D % 32 == 0) {
      extend_attention_items_bf16<D>(a, items, b, e);
      return;
    }
#endif
    extend_attention_items<D, TQ, TKV>(a, items, b, e);
  });
}

}  // namespace

const KernelTable* table() {
  static const KernelTable t = {
      SGL_ISA_NAME, rmsnorm, rope, silu_and_mul, argmax_rows, store_kv, decode_attention, decode_merge, extend_attention,
      linear,
#if defined(__AVX512BF16__)
      true,
#else
      false,
#endif
  };
  return &t;
}

}  // namespace SGL_ISA
}  // namespace sgl_kernel
