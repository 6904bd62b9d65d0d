// One float vector type per instruction set; every kernel is written once against it.
//
// This header is compiled once per ISA (kernels.cpp with SGL_ISA set and the matching -m flags),
// so everything here lives in that ISA's namespace: no inline function compiled for AVX-512 can
// be merged by the linker into the code another ISA runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"

namespace sgl_kernel {
namespace SGL_ISA {

inline float bf16_to_float(bf16 x) {
  uint32_t bits = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((bits >> 16) | 0x40)};  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bf16{uint16_t(bits >> 16)};
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bf16_to_float(x); }
template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) { return float_to_bf16(x); }

// x rounded to T's precision, kept as a float (the double rounding torch's 16-bit ops do).
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

inline float fmax_(float a, float b) { return a > b ? a : b; }
inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

#if defined(__AVX512F__)

struct VecF {
  static constexpr int W = 16;
  __m512 v;
  static VecF zero() { return {_mm512_setzero_ps()}; }
  static VecF set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecF load(const bf16* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  // W pairs of bf16 (k, k + 1) as two float vectors: the first elements, the second
  static void load_bf16_pairs(const bf16* p, VecF& first, VecF& second) {
    __m512i w = _mm512_loadu_si512(p);
    first.v = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    second.v = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const {
#if defined(__AVX512BF16__)
    __m256bh h = _mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i&>(h));
#else
    __m512i x = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    x = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
#endif
  }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  float reduce_max() const { return _mm512_reduce_max_ps(v); }
  // Lane i = the sum of v[i]'s lanes, for W vectors: W dot products reduced at once, by a tree of
  // shuffles and adds (15 adds for 16 sums; one reduce_add each would take 64).
  static VecF transpose_sum(const VecF* v) {
    __m512 l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
      l1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v), _mm512_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: vectors 4i..4i+3, each the sum of its lane
      l2[i] = _mm512_add_ps(_mm512_shuffle_ps(l1[2 * i], l1[2 * i + 1], 0x44), _mm512_shuffle_ps(l1[2 * i], l1[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; ++i)  // lanes: vectors 8i..8i+3 (lanes 0+2, 1+3), 8i+4..8i+7 (the same)
      l3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(l2[2 * i], l2[2 * i + 1], 0x44), _mm512_shuffle_f32x4(l2[2 * i], l2[2 * i + 1], 0xEE));
    return {_mm512_add_ps(_mm512_shuffle_f32x4(l3[0], l3[1], 0x88), _mm512_shuffle_f32x4(l3[0], l3[1], 0xDD))};
  }
  // v rounded to bf16 precision (round to nearest even), still as floats
  VecF round_bf16() const {
    __m512i x = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    x = _mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return {_mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u))))};
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VecF vmin(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VecF vround(VecF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline VecF vpow2i(VecF n) {  // 2^n for integral n in [-126, 127]
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}

#elif defined(__AVX2__)

struct VecF {
  static constexpr int W = 8;
  __m256 v;
  static VecF zero() { return {_mm256_setzero_ps()}; }
  static VecF set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecF load(const bf16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static void load_bf16_pairs(const bf16* p, VecF& first, VecF& second) {
    __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    first.v = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    second.v = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u))));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    __m256i x = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    x = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    // packus works within 128-bit lanes: [a0..3 a0..3 | a4..7 a4..7]; gather the halves
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  float reduce_max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static VecF transpose_sum(const VecF* v) {  // as the AVX-512 one, for 8 vectors
    __m256 l1[4], l2[2];
    for (int i = 0; i < 4; ++i)
      l1[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v), _mm256_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
    for (int i = 0; i < 2; ++i)
      l2[i] = _mm256_add_ps(_mm256_shuffle_ps(l1[2 * i], l1[2 * i + 1], 0x44), _mm256_shuffle_ps(l1[2 * i], l1[2 * i + 1], 0xEE));
    return {_mm256_add_ps(_mm256_permute2f128_ps(l2[0], l2[1], 0x20), _mm256_permute2f128_ps(l2[0], l2[1], 0x31))};
  }
  VecF round_bf16() const {
    __m256i x = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    x = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    return {_mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xffff0000u))))};
  }
};
inline VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF vmax(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VecF vmin(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VecF vround(VecF a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline VecF vpow2i(VecF n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(e, 23))};
}

#else  // portable scalar code for CPUs without AVX2: correct everywhere, fast nowhere

struct VecF {
  static constexpr int W = 1;
  float v;
  static VecF zero() { return {0.f}; }
  static VecF set1(float x) { return {x}; }
  static VecF load(const float* p) { return {*p}; }
  static VecF load(const bf16* p) { return {bf16_to_float(*p)}; }
  static void load_bf16_pairs(const bf16* p, VecF& first, VecF& second) {
    first.v = bf16_to_float(p[0]);
    second.v = bf16_to_float(p[1]);
  }
  void store(float* p) const { *p = v; }
  void store(bf16* p) const { *p = float_to_bf16(v); }
  float reduce_add() const { return v; }
  float reduce_max() const { return v; }
  static VecF transpose_sum(const VecF* v) { return v[0]; }
  VecF round_bf16() const { return {bf16_to_float(float_to_bf16(v))}; }
};
inline VecF operator+(VecF a, VecF b) { return {a.v + b.v}; }
inline VecF operator-(VecF a, VecF b) { return {a.v - b.v}; }
inline VecF operator*(VecF a, VecF b) { return {a.v * b.v}; }
inline VecF operator/(VecF a, VecF b) { return {a.v / b.v}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {a.v * b.v + c.v}; }
inline VecF vmax(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }
inline VecF vmin(VecF a, VecF b) { return {a.v < b.v ? a.v : b.v}; }
inline VecF vround(VecF a) { return {std::nearbyint(a.v)}; }
inline VecF vpow2i(VecF n) { return {std::ldexp(1.f, int(n.v))}; }

#endif

template <typename T> inline VecF round_to_vec(VecF x);
template <> inline VecF round_to_vec<float>(VecF x) { return x; }
template <> inline VecF round_to_vec<bf16>(VecF x) { return x.round_bf16(); }

// exp(x) for x <= 88: a degree-6 polynomial on the remainder of a base-2 split, relative error
// about 2e-7; inputs below -87 (masked keys are never fed here) flush to 0.
inline VecF vexp(VecF x) {
  x = vmax(vmin(x, VecF::set1(88.3762626647949f)), VecF::set1(-87.3365478515625f));
  VecF n = vround(x * VecF::set1(1.44269504088896341f));
  VecF r = fmadd(n, VecF::set1(-0.693359375f), x);
  r = fmadd(n, VecF::set1(2.12194440e-4f), r);
  VecF p = VecF::set1(1.9875691500e-4f);
  p = fmadd(p, r, VecF::set1(1.3981999507e-3f));
  p = fmadd(p, r, VecF::set1(8.3334519073e-3f));
  p = fmadd(p, r, VecF::set1(4.1665795894e-2f));
  p = fmadd(p, r, VecF::set1(1.6666665459e-1f));
  p = fmadd(p, r, VecF::set1(5.0000001201e-1f));
  p = fmadd(p * r, r, r + VecF::set1(1.f));
  return p * vpow2i(n);
}

}  // namespace SGL_ISA
}  // namespace sgl_kernel
