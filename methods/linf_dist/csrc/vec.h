// Thin portable SIMD layer for the lp-distance kernels: GCC/Clang vector extensions.
//
// The lane count W follows the ISA the extension is compiled for (-march=native): 16 with AVX-512F,
// 8 with AVX/AVX2, 4 otherwise (SSE2 / NEON / generic, lowered by the compiler). CB_VEC_WIDTH overrides
// it, which lets the 16-lane code paths be exercised (as pairs of 8-lane ops) on an AVX2-only machine.
//
// Everything here is plain IEEE arithmetic; the extension is compiled with -ffp-contract=off, so a
// fused multiply-add happens only where fmadd()/fma_exact() ask for one. That keeps every result a fixed
// function of the inputs, whatever the tiling or thread split.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE__) || defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CB_X86 1
#endif

#ifndef CB_VEC_WIDTH
#if defined(__AVX512F__)
#define CB_VEC_WIDTH 16
#elif defined(__AVX__)
#define CB_VEC_WIDTH 8
#else
#define CB_VEC_WIDTH 4
#endif
#endif

namespace cb {

constexpr int W = CB_VEC_WIDTH;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

static inline vf ld(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline vf splat(float s) { return vf{} + s; }
static inline vi splati(int32_t s) { return vi{} + s; }
// First n (< W) lanes from p, the rest `fill`.
static inline vf ld_part(const float* p, int n, float fill) {
  vf v = splat(fill);
  for (int k = 0; k < n; ++k) v[k] = p[k];
  return v;
}
static inline void st_part(float* p, vf v, int n) {
  for (int k = 0; k < n; ++k) p[k] = v[k];
}
static inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
static inline vf signbit_of(vf v) { return (vf)((vi)v & (int32_t)0x80000000); }
// Exactly maxps / minps semantics (second operand on NaN); inputs here are finite.
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vsel(vi m, vf a, vf b) { return m ? a : b; }
static inline vf vand(vf a, vi m) { return (vf)((vi)a & m); }
static inline vf vcvt(vi a) { return __builtin_convertvector(a, vf); }

static inline bool any(vi m) {
#if CB_VEC_WIDTH == 8 && defined(__AVX__)
  return _mm256_movemask_ps((__m256)m) != 0;
#else
  int32_t r = 0;
  for (int k = 0; k < W; ++k) r |= m[k];
  return r != 0;
#endif
}

// a*b + c, fused where the hardware has FMA (fast path; callers don't rely on the single rounding).
static inline vf fmadd(vf a, vf b, vf c) {
#if CB_VEC_WIDTH == 8 && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif CB_VEC_WIDTH == 16 && defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif CB_VEC_WIDTH == 4 && defined(__FMA__)
  return (vf)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
#else
  return a * b + c;
#endif
}
// a*b + c with a single rounding, always (the residual of a product must be exact).
static inline vf fma_exact(vf a, vf b, vf c) {
#if (CB_VEC_WIDTH == 8 && defined(__FMA__)) || (CB_VEC_WIDTH == 16 && defined(__AVX512F__)) || \
    (CB_VEC_WIDTH == 4 && defined(__FMA__))
  return fmadd(a, b, c);
#else
  vf r;
  for (int k = 0; k < W; ++k) r[k] = std::fma(a[k], b[k], c[k]);
  return r;
#endif
}

static inline float hmax(vf v) {
  float r = v[0];
  for (int k = 1; k < W; ++k) r = v[k] > r ? v[k] : r;
  return r;
}
static inline float hmin(vf v) {
  float r = v[0];
  for (int k = 1; k < W; ++k) r = v[k] < r ? v[k] : r;
  return r;
}
// Lane sum in double, in a fixed order (pairwise over lanes).
static inline double hsum(vf v) {
  double t[W];
  for (int k = 0; k < W; ++k) t[k] = v[k];
  for (int s = W / 2; s >= 1; s /= 2)
    for (int k = 0; k < s; ++k) t[k] += t[k + s];
  return t[0];
}

// ---- fast log2 / exp2 ---------------------------------------------------------------------------
// log2(t) = k + log2(1 + f), t = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2)); f is exact. log2(1+f) = f P(f)
// with P a near-minimax polynomial (relative error of P: 2e-7 at degree 7, 4.5e-8 at degree 8).
// For t <= 0 or denormal t the result is finite garbage (>= -150 for t >= 0): callers mask those lanes.
// Polynomials by Estrin's scheme: the dependency chain is what limits these loops (a Horner chain keeps
// too many vectors in flight for the reorder buffer), so the shorter tree is ~10% faster overall.
template <int DEG>
static inline vf log2_poly(vf f);
template <>
inline vf log2_poly<7>(vf f) {
  const vf f2 = f * f, f4 = f2 * f2;
  const vf p01 = fmadd(splat(-0.7213528156280518f), f, splat(1.442694902420044f));
  const vf p23 = fmadd(splat(-0.3602396249771118f), f, splat(0.48092323541641235f));
  const vf p45 = fmadd(splat(-0.24887715280056f), f, splat(0.28709879517555237f));
  const vf p67 = fmadd(splat(-0.14580988883972168f), f, splat(0.2340417057275772f));
  return fmadd(fmadd(p67, f2, p45), f4, fmadd(p23, f2, p01));
}
template <>
inline vf log2_poly<8>(vf f) {
  const vf f2 = f * f, f4 = f2 * f2;
  const vf p01 = fmadd(splat(-0.7213473320007324f), f, splat(1.4426950216293335f));
  const vf p23 = fmadd(splat(-0.3607036769390106f), f, splat(0.48091062903404236f));
  const vf p45 = fmadd(splat(-0.23894493281841278f), f, splat(0.28791624307632446f));
  const vf p67 = fmadd(splat(-0.2072690725326538f), f, splat(0.21571587026119232f));
  const vf p47 = fmadd(p67, f2, p45);
  const vf p48 = fmadd(splat(0.12583546340465546f), f4, p47);
  return fmadd(p48, f4, fmadd(p23, f2, p01));
}

template <int DEG>
static inline vf vlog2(vf t, vf& f_out) {
  vi i = (vi)t;
  vi k = (i - 0x3f3504f3) >> 23;  // arithmetic shift
  vf f = (vf)(i - (vi)((vu)k << 23)) - 1.0f;
  f_out = f;
  return fmadd(f, log2_poly<DEG>(f), vcvt(k));
}

// 2^u for u in [-126, 64] (relative error 1.5e-7); other lanes are garbage and must be masked by the caller.
static inline vf vexp2(vf u) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf r = u + magic;
  vi n = (vi)r - 0x4b400000;
  vf f = u - (r - magic);  // in [-0.5, 0.5]
  const vf f2 = f * f;
  const vf p01 = fmadd(splat(0.6931469440460205f), f, splat(1.0000001192092896f));
  const vf p23 = fmadd(splat(0.05550713464617729f), f, splat(0.24022120237350464f));
  const vf p45 = fmadd(splat(0.0013276466634124517f), f, splat(0.009675541892647743f));
  const vf p = fmadd(fmadd(p45, f2, p23), f2, p01);
  return (vf)((vi)p + (vi)((vu)n << 23));
}

// Flush-to-zero / denormals-are-zero for the power kernels (restored on scope exit). Worker threads
// don't inherit the caller's MXCSR, so every parallel lambda sets it itself.
struct FtzGuard {
#if defined(CB_X86)
  unsigned old;
  FtzGuard() : old(_mm_getcsr()) { _mm_setcsr(old | 0x8040u); }
  ~FtzGuard() { _mm_setcsr(old); }
#endif
};

}  // namespace cb
