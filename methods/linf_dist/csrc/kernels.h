// Fused CPU kernels for the lp-distance op (float32), header-only: the includer provides
//   template <class F> void cb::parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f);
// (at::parallel_for in the torch extension, a serial loop in stand-alone benchmarks).
//
// Layout: x (B, n), w (N, n), y (B, N), all contiguous float32; n = n_in, N = n_out.
// Parallelism only ever splits work between outputs that are computed independently, and every output
// element is produced by one fixed sequence of operations, so results are bitwise identical for any
// thread count and across calls.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace cb {

// ---------------------------------------------------------------------------------------------------
// Tiling parameters (register tiles: R rows of x against C rows of w; 16 vector registers with AVX2,
// 32 with AVX-512).
#if CB_VEC_WIDTH == 16
constexpr int MAX_R = 4, MAX_C = 4;  // p = inf
constexpr int INT_R = 3, INT_C = 4;  // small integer p
constexpr int IV_R = 2, IV_C = 4;    // interval
#else
constexpr int MAX_R = 2, MAX_C = 4;
constexpr int INT_R = 2, INT_C = 4;
constexpr int IV_R = 2, IV_C = 2;
#endif
constexpr int KCH = 8;                   // vectors per arg-max bookkeeping chunk
constexpr int64_t L2_BLOCK = 256 << 10;  // bytes of w kept hot while a thread sweeps its rows

constexpr double TWO_M100 = 7.888609052210118e-31;  // 2^-100
constexpr double TWO_P100 = 1.2676506002282294e30;  // 2^100
constexpr float FLT_MIN_NORMAL = 1.17549435e-38f;

inline bool in_scaling_range(double v) { return v >= TWO_M100 && v <= TWO_P100; }

int64_t o_block(int64_t n, int c) {
  int64_t ob = std::max<int64_t>(c, L2_BLOCK / std::max<int64_t>(1, 4 * n));
  return (ob / c) * c;
}

// Runs body(b0, rows, o0, cols, R, C) over the B x N grid in register tiles: full R x C tiles, then the
// remainders. Threads split the row tiles; within its rows each thread walks w in L2-sized blocks.
template <int R, int C, class Tile>
void for_tiles(int64_t B, int64_t N, int64_t n, const Tile& tile) {
  const int64_t nbt = (B + R - 1) / R;
  const int64_t OB = o_block(n, C);
  parallel_for(0, nbt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ob = 0; ob < N; ob += OB) {
      const int64_t oe = std::min(N, ob + OB);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * R;
        if (b + R <= B) {
          int64_t o = ob;
          for (; o + C <= oe; o += C) tile.template run<R, C>(b, o);
          for (; o < oe; ++o) tile.template run<R, 1>(b, o);
        } else {
          for (int64_t bb = b; bb < B; ++bb) {
            int64_t o = ob;
            for (; o + C <= oe; o += C) tile.template run<1, C>(bb, o);
            for (; o < oe; ++o) tile.template run<1, 1>(bb, o);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// p = inf: max |x - w| with the first arg-max.
//
// With the arg-max, the per-lane maximum of every chunk of KCH vectors is stored (one store per pair and
// chunk, to a small per-thread buffer). At the end: y = max over everything; the first chunk holding y in
// some lane contains the first maximiser; only that chunk is rescanned, restricted to the lanes that reach
// y there (exact equality: the same subtraction and |.| are redone on the same floats).
inline float* chunk_scratch(size_t nfloats) {
  thread_local std::vector<float> buf;
  if (buf.size() < nfloats + W) buf.resize(nfloats + W);
  return buf.data();
}

static inline uint32_t lane_bits(vi m) {
#if CB_VEC_WIDTH == 8 && defined(__AVX__)
  return uint32_t(_mm256_movemask_ps((__m256)m));
#else
  uint32_t r = 0;
  for (int k = 0; k < W; ++k) r |= (m[k] ? 1u : 0u) << k;
  return r;
#endif
}

template <bool IDX>
struct LinfTile {
  const float* x;
  const float* w;
  int64_t n, N;
  float* y;
  int64_t* idx;

  template <int R, int C, bool PART>
  static inline void step(vf (&acc)[R][C], const float* xp, const float* wp, int64_t n, int64_t off, int tail) {
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = PART ? ld_part(xp + r * n + off, tail, 0.f) : ld(xp + r * n + off);
    for (int c = 0; c < C; ++c) {
      const vf wv = PART ? ld_part(wp + c * n + off, tail, 0.f) : ld(wp + c * n + off);
      for (int r = 0; r < R; ++r) acc[r][c] = vmax(acc[r][c], vabs(xv[r] - wv));
    }
  }

  template <int R, int C>
  void run(int64_t b, int64_t o) const {
    const float* xp = x + b * n;
    const float* wp = w + o * n;
    const int64_t nv = n / W;
    const int tail = int(n % W);
    const int64_t nsteps = nv + (tail ? 1 : 0);
    if (!IDX) {
      vf acc[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = splat(0.f);
      for (int64_t s = 0; s < nv; ++s) step<R, C, false>(acc, xp, wp, n, s * W, 0);
      if (tail) step<R, C, true>(acc, xp, wp, n, nv * W, tail);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[(b + r) * N + o + c] = hmax(acc[r][c]);
      return;
    }
    const int64_t nch = (nsteps + KCH - 1) / KCH;
    float* cm = chunk_scratch(size_t(nch) * R * C * W);  // [chunk][r][c] lane maxima
    for (int64_t ch = 0; ch < nch; ++ch) {
      const int64_t s0 = ch * KCH;
      vf acc[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = splat(0.f);
      const int64_t s1 = std::min<int64_t>(s0 + KCH, nv);
      for (int64_t s = s0; s < s1; ++s) step<R, C, false>(acc, xp, wp, n, s * W, 0);
      if (tail && nv >= s0 && nv < s0 + KCH) step<R, C, true>(acc, xp, wp, n, nv * W, tail);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) st(cm + ((ch * R + r) * C + c) * W, acc[r][c]);
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        vf mv = splat(0.f);
        for (int64_t ch = 0; ch < nch; ++ch) mv = vmax(mv, ld(cm + ((ch * R + r) * C + c) * W));
        const float m = hmax(mv);
        const vf mm = splat(m);
        int64_t ch = 0;
        uint32_t lanes = 0;
        for (; ch < nch; ++ch) {
          lanes = lane_bits(ld(cm + ((ch * R + r) * C + c) * W) == mm);
          if (lanes) break;
        }
        const float* xr = xp + r * n;
        const float* wr = wp + c * n;
        int64_t found = -1;
        const int64_t se = std::min<int64_t>(ch * KCH + KCH, nsteps);
        for (int64_t s = ch * KCH; s < se; ++s) {
          const int64_t i0 = s * W;
          const vf xv = s < nv ? ld(xr + i0) : ld_part(xr + i0, tail, 0.f);
          const vf wv = s < nv ? ld(wr + i0) : ld_part(wr + i0, tail, 0.f);
          const uint32_t hit = lane_bits(vabs(xv - wv) == mm) & lanes;
          if (hit) {
            found = i0 + __builtin_ctz(hit);
            break;
          }
        }
        y[(b + r) * N + o + c] = m;
        idx[(b + r) * N + o + c] = (found < 0 || found >= n) ? 0 : found;  // always found for finite inputs
      }
  }
};

// ---------------------------------------------------------------------------------------------------
// Interval forward at p = inf: U = max_i max(u_i - w_i, w_i - l_i), L = max(0, -min_i min(u_i - w_i, w_i - l_i))
// (l - w = -(w - l) exactly, so this is the reference's formula bit for bit). Tails are padded by repeating
// the last column, which leaves every max/min unchanged.
struct IntervalTile {
  const float* l;
  const float* u;
  const float* w;
  int64_t n, N;
  float* lo;
  float* hi;

  template <int R, int C, bool PART>
  static inline void step(vf (&ahi)[R][C], vf (&alo)[R][C], const float* lp, const float* up, const float* wp,
                          int64_t n, int64_t off, int tail) {
    vf lv[R], uv[R];
    for (int r = 0; r < R; ++r) {
      lv[r] = PART ? ld_part(lp + r * n + off, tail, lp[r * n + off + tail - 1]) : ld(lp + r * n + off);
      uv[r] = PART ? ld_part(up + r * n + off, tail, up[r * n + off + tail - 1]) : ld(up + r * n + off);
    }
    for (int c = 0; c < C; ++c) {
      const vf wv = PART ? ld_part(wp + c * n + off, tail, wp[c * n + off + tail - 1]) : ld(wp + c * n + off);
      for (int r = 0; r < R; ++r) {
        const vf a = uv[r] - wv;
        const vf bq = wv - lv[r];
        ahi[r][c] = vmax(ahi[r][c], vmax(a, bq));
        alo[r][c] = vmin(alo[r][c], vmin(a, bq));
      }
    }
  }

  template <int R, int C>
  void run(int64_t b, int64_t o) const {
    const float* lp = l + b * n;
    const float* up = u + b * n;
    const float* wp = w + o * n;
    vf ahi[R][C], alo[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        ahi[r][c] = splat(-INFINITY);
        alo[r][c] = splat(INFINITY);
      }
    const int64_t nv = n / W;
    const int tail = int(n % W);
    for (int64_t s = 0; s < nv; ++s) step<R, C, false>(ahi, alo, lp, up, wp, n, s * W, 0);
    if (tail) step<R, C, true>(ahi, alo, lp, up, wp, n, nv * W, tail);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        hi[(b + r) * N + o + c] = hmax(ahi[r][c]);
        const float neg = -hmin(alo[r][c]);
        lo[(b + r) * N + o + c] = neg > 0.f ? neg : 0.f;
      }
  }
};

// ---------------------------------------------------------------------------------------------------
// Small integer p: exact powers by multiplication. The forward sums |x - w|^P without rescaling (as the
// reference CUDA code does for p <= 10) and falls back to the rescaled double-precision path for any pair
// whose sum leaves [2^-60, 2^100] (overflow, or terms small enough for the flush-to-zero to matter).
template <int P>
static inline vf ipow(vf d) {  // |d|^P
  if constexpr (P == 1) {
    return vabs(d);
  } else if constexpr (P == 2) {
    return d * d;
  } else if constexpr (P % 2 == 0) {
    const vf h = ipow<P / 2>(d);
    return h * h;
  } else {
    return ipow<P - 1>(d) * vabs(d);
  }
}

constexpr double INT_SUM_LO = 8.673617379884035e-19;  // 2^-60

template <int P>
struct IntPowTile {
  const float* x;
  const float* w;
  int64_t n, N;
  float* y;
  uint8_t* slow;

  template <int R, int C, bool PART>
  static inline void step(vf (&acc)[R][C], const float* xp, const float* wp, int64_t n, int64_t off, int tail) {
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = PART ? ld_part(xp + r * n + off, tail, 0.f) : ld(xp + r * n + off);
    for (int c = 0; c < C; ++c) {
      const vf wv = PART ? ld_part(wp + c * n + off, tail, 0.f) : ld(wp + c * n + off);
      for (int r = 0; r < R; ++r) {
        const vf d = xv[r] - wv;
        if constexpr (P == 1) {
          acc[r][c] = acc[r][c] + vabs(d);
        } else if constexpr (P % 2 == 0) {
          const vf h = ipow<P / 2>(d);
          acc[r][c] = fmadd(h, h, acc[r][c]);
        } else {
          acc[r][c] = fmadd(ipow<P - 1>(d), vabs(d), acc[r][c]);
        }
      }
    }
  }

  template <int R, int C>
  void run(int64_t b, int64_t o) const {
    FtzGuard ftz;
    const float* xp = x + b * n;
    const float* wp = w + o * n;
    vf acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = splat(0.f);
    const int64_t nv = n / W;
    const int tail = int(n % W);
    for (int64_t s = 0; s < nv; ++s) step<R, C, false>(acc, xp, wp, n, s * W, 0);
    if (tail) step<R, C, true>(acc, xp, wp, n, nv * W, tail);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        const double s = hsum(acc[r][c]);
        const int64_t k = (b + r) * N + o + c;
        if (s >= INT_SUM_LO && s <= TWO_P100) {
          y[k] = float(P == 1 ? s : (P == 2 ? std::sqrt(s) : std::pow(s, 1.0 / P)));
          slow[k] = 0;
        } else {
          slow[k] = 1;
        }
      }
  }
};

// Double-precision rescaled forward for one pair (the rare out-of-range pairs): m * (sum (|d|/m)^p)^(1/p).
float lp_pair_double(const float* xr, const float* wr, int64_t n, double p) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(double(xr[i]) - double(wr[i])));
  if (m == 0.0) return 0.f;
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double t = std::fabs(double(xr[i]) - double(wr[i])) / m;
    if (t > 0.0) s += std::pow(t, p);
  }
  return float(m * std::pow(s, 1.0 / p));
}

// ---------------------------------------------------------------------------------------------------
// General p forward, per pair, after m = max |x - w| is known: S = sum 2^(p log2(|x - w| / m)), terms
// below 2^-100 (relative to the max term, which is 1) flushed to exactly 0; y = m S^(1/p).
double pow_sum_pair(const float* xr, const float* wr, int64_t n, float z, float p, float tmin) {
  const vf vz = splat(z), vp = splat(p), vt = splat(tmin);
  vf acc0 = splat(0.f), acc1 = splat(0.f);
  const int64_t nv = n / W;
  const int tail = int(n % W);
  auto term = [&](vf d) {
    const vf t = vabs(d) * vz;
    vf f;
    const vf lg = vlog2<7>(t, f);
    return vand(vexp2(lg * vp), t > vt);
  };
  int64_t s = 0;
  for (; s + 2 <= nv; s += 2) {
    acc0 += term(ld(xr + s * W) - ld(wr + s * W));
    acc1 += term(ld(xr + s * W + W) - ld(wr + s * W + W));
  }
  if (s < nv) acc0 += term(ld(xr + s * W) - ld(wr + s * W));
  if (tail) acc1 += term(ld_part(xr + nv * W, tail, 0.f) - ld_part(wr + nv * W, tail, 0.f));
  return hsum(acc0) + hsum(acc1);
}

// ---------------------------------------------------------------------------------------------------
// Backward for finite p: one fused pass computes each coefficient c = sign(d) (|d| / y)^(p-1) once and
// accumulates g*c into grad_x (sum over outputs) and -g*c into grad_w (sum over the batch). The pass is
// split into column chunks of n_in: a chunk's grad_x and grad_w entries depend on that chunk only, so the
// chunks run in parallel with no atomics and no partial buffers, and each entry is summed in a fixed order.
//
// Per-pair scalars (B x N): z = 1/y (0: skip the pair, < 0: double-precision path) and, for the precise
// large-p path, the offset A (see PowCoef).
struct PairParams {
  vf z, g, a;
  float zs, gs, as;
};

// Exact small-integer coefficient: (d z)^(P-1) with the sign of d (sign(0) = +1 for P = 1).
template <int P>
struct IntCoef {
  static constexpr int K = 4;
  inline vf operator()(vf xv, vf wv, const PairParams& q) const {
    const vf d = xv - wv;
    if constexpr (P == 1) {
      return vsel(d >= 0.f, q.g, -q.g);
    } else if constexpr (P == 2) {
      return d * (q.z * q.g);
    } else {
      const vf t = d * q.z;
      vf c;
      if constexpr (P % 2 == 0) {
        c = ipow<P - 2>(t) * t;  // odd power P - 1 keeps the sign of d
      } else {
        c = ipow<P - 1>(t);  // even power: put the sign of d back
        c = (vf)((vi)c | ((vi)d & (int32_t)0x80000000));
      }
      return c * q.g;
    }
  }
  double scalar(double d, double y, double) const {
    const double s = d >= 0 ? 1.0 : -1.0;
    if (P == 1) return s;
    return s * std::pow(std::fabs(d) / y, P - 1);
  }
};

// General p: c = 2^((p-1) log2(|d| z) + A), masked to 0 where (|d| z)^(p-1) < 2^-100.
//
// Plain (p <= PRECISE_P): A = 0, z = 1/y. Error ~(p-1) * 1e-7 relative per coefficient.
// Precise (p > PRECISE_P): at large p the coefficient amplifies relative errors in |d| and in y by p - 1
// (fl(x - w) alone would cost (p-1) 2^-24 ~ 6e-5 at p = 1000; so would the rounding of the saved y).
// So: |d| is carried as fl(x - w) plus its exact TwoSum error, log2(|d| z) gets the first-order correction
// (residual of |d| z by FMA plus the TwoSum error) / (t ln 2), and y is not trusted beyond being a scale:
// A = -(p-1)/p log2(sum_j (|d_j| z)^p), computed by a precise pre-pass, makes the coefficients exactly
// (|d|/y_true)^(p-1) whatever the rounding of y (the identity holds for any scale z > 0).
constexpr double PRECISE_P = 16.0;

template <bool PRECISE>
static inline vf log2_dz(vf xv, vf wv, vf z, vf& t_out) {
  const vf s = xv - wv;
  const vf a = vabs(s);
  const vf t = a * z;
  t_out = t;
  vf f;
  if constexpr (!PRECISE) {
    return vlog2<7>(t, f);
  } else {
    const vf lg = vlog2<8>(t, f);
    // TwoSum: x + (-w) = s + e exactly.
    const vf ap = s + wv;       // x'
    const vf bp = s - ap;       // -w'
    const vf da = xv - ap;      // x - x'
    const vf db = wv + bp;      // -((-w) - (-w'))
    const vf e = da - db;       // x - w - s
    const vf es = (vf)((vi)e ^ ((vi)s & (int32_t)0x80000000));  // |d| = a + es
    const vf rho = fma_exact(a, z, -t);                          // a z - t, exact
    const vf corr = fmadd(es, z, rho);                           // |d| z - t (first order)
    const vf inv = fmadd(splat(-1.44269504f), f, splat(1.44269504f));  // ~ 1/((1+f) ln 2)
    return fmadd(corr, inv, lg);
  }
}

template <bool PRECISE>
struct PowCoef {
  static constexpr int K = 2;
  vf pm1, tmin;
  inline vf operator()(vf xv, vf wv, const PairParams& q) const {
    vf t;
    const vf l = log2_dz<PRECISE>(xv, wv, q.z, t);
    const vf u = PRECISE ? fmadd(l, pm1, q.a) : l * pm1;
    const vf c = vand(vexp2(u), t > tmin);
    const vf d = xv - wv;
    return (vf)((vi)c | ((vi)d & (int32_t)0x80000000)) * q.g;
  }
  double p;
  double scalar(double d, double y, double a) const {
    const double s = d >= 0 ? 1.0 : -1.0;
    const double t = std::fabs(d) / y;
    if (t == 0.0) return 0.0;
    return s * std::exp2((p - 1.0) * std::log2(t) + a);
  }
};

template <class Coef, bool NX, bool NW>
void bwd_chunks(const float* x, const float* w, const float* g, const float* zb, const float* ab, const float* y,
                int64_t B, int64_t N, int64_t n, float* gx, float* gw, const Coef& coef) {
  constexpr int K = Coef::K;
  constexpr int64_t CW = int64_t(K) * W;
  const int64_t nch = (n + CW - 1) / CW;
  parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    FtzGuard ftz;
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t i0 = ch * CW;
      const int len = int(std::min<int64_t>(CW, n - i0));
      const int nfull = len / W;
      const int tl = len % W;
      for (int64_t b = 0; b < B; ++b) {
        const float* xr = x + b * n + i0;
        vf xv[K], acc[K];
        for (int k = 0; k < K; ++k) {
          xv[k] = k < nfull ? ld(xr + k * W) : (k == nfull && tl ? ld_part(xr + k * W, tl, 0.f) : splat(0.f));
          acc[k] = splat(0.f);
        }
        const float* zrow = zb + b * N;
        const float* grow = g + b * N;
        for (int64_t o = 0; o < N; ++o) {
          const float zs = zrow[o];
          if (zs == 0.f) continue;
          const float gs = grow[o];
          const float* wr = w + o * n + i0;
          float* gwr = gw ? gw + o * n + i0 : nullptr;
          if (zs < 0.f) {  // double-precision path for pairs whose y is outside [2^-100, 2^100]
            const double yv = y[b * N + o];
            const double av = ab ? ab[b * N + o] : 0.0;
            float tmp[K * W] = {};  // (acc stays in registers: no dynamic lane indexing on it)
            for (int i = 0; i < len; ++i) {
              const double d = double(xr[i]) - double(wr[i]);
              tmp[i] = float(double(gs) * coef.scalar(d, yv, av));
              if (NW) gwr[i] -= tmp[i];
            }
            for (int k = 0; k < K; ++k) acc[k] += ld(tmp + k * W);
            continue;
          }
          PairParams q;
          q.zs = zs;
          q.gs = gs;
          q.as = ab ? ab[b * N + o] : 0.f;
          q.z = splat(zs);
          q.g = splat(gs);
          q.a = splat(q.as);
          if (len == CW) {
            for (int k = 0; k < K; ++k) {
              const vf cg = coef(xv[k], ld(wr + k * W), q);
              acc[k] += cg;
              if (NW) st(gwr + k * W, ld(gwr + k * W) - cg);
            }
          } else {
            for (int k = 0; k < nfull; ++k) {
              const vf cg = coef(xv[k], ld(wr + k * W), q);
              acc[k] += cg;
              if (NW) st(gwr + k * W, ld(gwr + k * W) - cg);
            }
            if (tl) {
              const vf cg = coef(xv[nfull], ld_part(wr + nfull * W, tl, 0.f), q);
              acc[nfull] += cg;
              if (NW) st_part(gwr + nfull * W, ld_part(gwr + nfull * W, tl, 0.f) - cg, tl);
            }
          }
        }
        if (NX) {
          float* gxr = gx + b * n + i0;
          for (int k = 0; k < nfull; ++k) st(gxr + k * W, acc[k]);
          if (tl) st_part(gxr + nfull * W, acc[nfull], tl);
        }
      }
    }
  });
}

template <class Coef>
void bwd_dispatch(bool nx, bool nw, const float* x, const float* w, const float* g, const float* zb, const float* ab,
                  const float* y, int64_t B, int64_t N, int64_t n, float* gx, float* gw, const Coef& coef) {
  if (nx && nw)
    bwd_chunks<Coef, true, true>(x, w, g, zb, ab, y, B, N, n, gx, gw, coef);
  else if (nx)
    bwd_chunks<Coef, true, false>(x, w, g, zb, ab, y, B, N, n, gx, nullptr, coef);
  else
    bwd_chunks<Coef, false, true>(x, w, g, zb, ab, y, B, N, n, nullptr, gw, coef);
}

// Precise pre-pass (p > PRECISE_P): A = -(p-1)/p log2(sum_j (|d_j| z)^p) per pair.
double precise_sum_pair(const float* xr, const float* wr, int64_t n, float z, float p, float tmin) {
  const vf vz = splat(z), vp = splat(p), vt = splat(tmin);
  vf acc = splat(0.f);
  const int64_t nv = n / W;
  const int tail = int(n % W);
  auto term = [&](vf xv, vf wv) {
    vf t;
    const vf l = log2_dz<true>(xv, wv, vz, t);
    return vand(vexp2(l * vp), t > vt);
  };
  for (int64_t s = 0; s < nv; ++s) acc += term(ld(xr + s * W), ld(wr + s * W));
  if (tail) acc += term(ld_part(xr + nv * W, tail, 0.f), ld_part(wr + nv * W, tail, 0.f));
  return hsum(acc);
}

float tmin_for(double e) {  // smallest t with t^e >= 2^-100 (and t a normal float)
  const double t = std::exp2(-100.0 / e);
  return float(std::max<double>(t, FLT_MIN_NORMAL));
}

// ===================================================================================================
// Drivers on raw pointers (the torch wrappers in lp_dist.cpp only check and allocate).

inline bool all_finite(const float* p, int64_t n) {
  const int64_t nv = n / W;
  vi bad = splati(0);
  for (int64_t s = 0; s < nv; ++s) {
    const vf v = ld(p + s * W);
    bad |= ~(v - v == 0.f);  // v - v is NaN for +-inf and NaN
  }
  for (int64_t i = nv * W; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return !any(bad);
}

inline void linf_forward(const float* x, const float* w, int64_t B, int64_t N, int64_t n, float* y, int64_t* idx) {
  if (idx) {
    LinfTile<true> t{x, w, n, N, y, idx};
    for_tiles<MAX_R, MAX_C>(B, N, n, t);
  } else {
    LinfTile<false> t{x, w, n, N, y, nullptr};
    for_tiles<MAX_R, MAX_C>(B, N, n, t);
  }
}

// Sparse backward at p = inf: grad_x threads over the batch, grad_w over the outputs; each entry is summed
// in a fixed order (outputs ascending for grad_x, batch ascending for grad_w).
inline void linf_backward(const float* x, const float* w, const int64_t* ip, const float* g, int64_t B, int64_t N,
                          int64_t n, float* gx, float* gw) {
  if (gx) {
    parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* out = gx + b * n;
        std::fill(out, out + n, 0.f);
        for (int64_t o = 0; o < N; ++o) {
          const int64_t i = ip[b * N + o];
          const float gv = g[b * N + o];
          out[i] += (x[b * n + i] - w[o * n + i] >= 0.f) ? gv : -gv;
        }
      }
    });
  }
  if (gw) {
    parallel_for(0, N, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) std::fill(gw + o * n, gw + o * n + n, 0.f);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t i = ip[b * N + o];
          const float gv = g[b * N + o];
          gw[o * n + i] -= (x[b * n + i] - w[o * n + i] >= 0.f) ? gv : -gv;
        }
    });
  }
}

inline void linf_interval(const float* l, const float* u, const float* w, int64_t B, int64_t N, int64_t n, float* lo,
                          float* hi) {
  IntervalTile t{l, u, w, n, N, lo, hi};
  for_tiles<IV_R, IV_C>(B, N, n, t);
}

template <int P>
void int_forward(const float* x, const float* w, int64_t B, int64_t N, int64_t n, float* y) {
  std::vector<uint8_t> slow(size_t(B * N));
  IntPowTile<P> t{x, w, n, N, y, slow.data()};
  for_tiles<INT_R, INT_C>(B, N, n, t);
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t o = 0; o < N; ++o)
        if (slow[b * N + o]) y[b * N + o] = lp_pair_double(x + b * n, w + o * n, n, P);
  });
}

inline bool small_int_p(double p) { return p == std::floor(p) && p >= 1.0 && p <= 8.0; }

inline void lp_forward(const float* xp, const float* wp, int64_t B, int64_t N, int64_t n, double p, float* yp) {
  if (small_int_p(p)) {
    switch (int(p)) {
      case 1: int_forward<1>(xp, wp, B, N, n, yp); break;
      case 2: int_forward<2>(xp, wp, B, N, n, yp); break;
      case 3: int_forward<3>(xp, wp, B, N, n, yp); break;
      case 4: int_forward<4>(xp, wp, B, N, n, yp); break;
      case 5: int_forward<5>(xp, wp, B, N, n, yp); break;
      case 6: int_forward<6>(xp, wp, B, N, n, yp); break;
      case 7: int_forward<7>(xp, wp, B, N, n, yp); break;
      default: int_forward<8>(xp, wp, B, N, n, yp); break;
    }
    return;
  }
  // m = max |x - w| (tiled), then the rescaled power sum per pair.
  linf_forward(xp, wp, B, N, n, yp, nullptr);
  const float pf = float(p);
  const float tmin = tmin_for(p);
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    FtzGuard ftz;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t o = 0; o < N; ++o) {
        const double m = yp[b * N + o];
        if (m == 0.0) continue;
        if (!in_scaling_range(m)) {
          yp[b * N + o] = lp_pair_double(xp + b * n, wp + o * n, n, p);
          continue;
        }
        const float z = float(1.0 / m);
        const double s = pow_sum_pair(xp + b * n, wp + o * n, n, z, pf, tmin);
        yp[b * N + o] = float(m * std::exp2(std::log2(s) / p));
      }
  });
}

inline bool needs_offsets(double p) { return !small_int_p(p) && p > PRECISE_P; }

// zb, ab: (B, N) scratch (ab only where needs_offsets(p), else may be null). gx / gw may be null (not needed); gw must be zeroed by the caller.
inline void lp_backward(const float* xp, const float* wp, const float* yp, const float* gp, int64_t B, int64_t N,
                        int64_t n, double p, float* gxp, float* gwp, float* zb, float* ab) {
  const bool is_int = small_int_p(p);
  const bool precise = !is_int && p > PRECISE_P;
  if (!precise) ab = nullptr;
  const float tmin_pre = tmin_for(p);
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    FtzGuard ftz;
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t o = 0; o < N; ++o) {
        const int64_t k = b * N + o;
        const double yv = yp[k];
        float z;
        if (gp[k] == 0.f)
          z = 0.f;  // contributes nothing
        else if (p == 1.0)
          z = 1.f;  // coefficient sign(d), y unused
        else if (yv == 0.0)
          z = 0.f;  // zero distance: zero subgradient (as the reference)
        else if (in_scaling_range(yv))
          z = float(1.0 / yv);
        else
          z = -1.f;
        zb[k] = z;
        if (!precise || z == 0.f) continue;
        const float* xr = xp + b * n;
        const float* wr = wp + o * n;
        double s;
        if (z > 0.f) {
          s = precise_sum_pair(xr, wr, n, z, float(p), tmin_pre);
        } else {
          s = 0.0;
          for (int64_t i = 0; i < n; ++i) {
            const double t = std::fabs(double(xr[i]) - double(wr[i])) / yv;
            if (t > 0.0) s += std::pow(t, p);
          }
        }
        ab[k] = (s > 0.0 && std::isfinite(s)) ? float(-(p - 1.0) / p * std::log2(s)) : 0.f;
      }
  });
  const bool nx = gxp != nullptr, nw = gwp != nullptr;
  if (!nx && !nw) return;
  if (is_int) {
    switch (int(p)) {
#define CB_INT_CASE(P)                                                                      \
  case P:                                                                                   \
    bwd_dispatch(nx, nw, xp, wp, gp, zb, nullptr, yp, B, N, n, gxp, gwp, IntCoef<P>{}); \
    break;
      CB_INT_CASE(1)
      CB_INT_CASE(2)
      CB_INT_CASE(3)
      CB_INT_CASE(4)
      CB_INT_CASE(5)
      CB_INT_CASE(6)
      CB_INT_CASE(7)
      CB_INT_CASE(8)
#undef CB_INT_CASE
    }
  } else if (precise) {
    PowCoef<true> c{splat(float(p - 1.0)), splat(tmin_for(p - 1.0)), p};
    bwd_dispatch(nx, nw, xp, wp, gp, zb, ab, yp, B, N, n, gxp, gwp, c);
  } else {
    PowCoef<false> c{splat(float(p - 1.0)), splat(tmin_for(p - 1.0)), p};
    bwd_dispatch(nx, nw, xp, wp, gp, zb, nullptr, yp, B, N, n, gxp, gwp, c);
  }
}

}  // namespace cb
