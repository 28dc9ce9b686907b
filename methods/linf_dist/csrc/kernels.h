// Fused CPU kernels for the lp-distance op (float32), header-only: the includer provides
//   template <class F> void cb::parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f);
//   int cb::num_threads();
// (at::parallel_for / at::get_num_threads in the torch extension, serial ones in stand-alone benchmarks).
//
// Layout: x (B, n), w (N, n), y (B, N), all contiguous float32; n = n_in, N = n_out.
// Parallelism only ever splits work between outputs that are computed independently, and every output
// element is produced by one fixed sequence of operations, so results are bitwise identical for any
// thread count and across calls.
#pragma once

#include <algorithm>
#include <atomic>
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
#ifndef CB_TILES
#define CB_TILES 2, 4, 2, 4, 3, 2  // measured best of 2x4, 3x4, 2x5, 4x3, 3x3 (interval: 2x2 .. 4x2)
#endif
constexpr int TILES[6] = {CB_TILES};
constexpr int MAX_R = TILES[0], MAX_C = TILES[1];
constexpr int INT_R = TILES[2], INT_C = TILES[3];
constexpr int IV_R = TILES[4], IV_C = TILES[5];
#endif
constexpr int KCH = 64 / W;              // vectors per arg-max chunk (KCH * W = 64 lanes: one bit mask)
constexpr int64_t L2_BLOCK = 256 << 10;  // bytes of w kept hot while a task sweeps its rows

constexpr double TWO_M100 = 7.888609052210118e-31;  // 2^-100
constexpr double TWO_P100 = 1.2676506002282294e30;  // 2^100
constexpr float FLT_MIN_NORMAL = 1.17549435e-38f;

inline bool in_scaling_range(double v) { return v >= TWO_M100 && v <= TWO_P100; }

inline int64_t o_block(int64_t n, int c) {
  int64_t ob = std::max<int64_t>(c, L2_BLOCK / std::max<int64_t>(1, 4 * n));
  return (ob / c) * c;
}

// Runs f(task) for every task in [0, ntasks), tasks claimed dynamically by the threads (an atomic counter).
// Every task writes outputs no other task touches, with a fixed sequence of operations, so the results do
// not depend on which thread runs what. Dynamic claiming (rather than a static split) matters on a shared
// machine: a thread that is descheduled for a while no longer holds the others up at the end. `pairs` is
// the call's total work (element pairs): below MIN_PAIRS_PER_THREAD per thread, fewer threads are woken
// (waking one costs microseconds on an idle machine, milliseconds on an oversubscribed one).
constexpr int64_t MIN_PAIRS_PER_THREAD = int64_t(1) << 20;

template <class F>
void parallel_tasks(int64_t ntasks, int64_t pairs, const F& f) {
  if (ntasks <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, pairs / MIN_PAIRS_PER_THREAD);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({ntasks, by_work, int64_t(num_threads())}));
  if (workers == 1) {
    for (int64_t t = 0; t < ntasks; ++t) f(t);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t wk = w0; wk < w1; ++wk)
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < ntasks;
           t = next.fetch_add(1, std::memory_order_relaxed))
        f(t);
  });
}

// Runs tile.run<R', C'>(b, o) over the B x N grid in register tiles: tasks are (a group of rows, an
// L2-sized block of w); within a task full R x C tiles, then the remainders.
template <int R, int C, class Tile>
void for_tiles(int64_t B, int64_t N, int64_t n, const Tile& tile) {
  constexpr int64_t RG = 16 * R;  // rows per task
  const int64_t OB = o_block(n, C);
  const int64_t nrg = (B + RG - 1) / RG, nob = (N + OB - 1) / OB;
  parallel_tasks(nrg * nob, B * N * n, [&](int64_t task) {
    const int64_t ob = (task % nob) * OB, oe = std::min(N, ob + OB);
    const int64_t b0 = (task / nob) * RG, b1 = std::min(B, b0 + RG);
    int64_t b = b0;
    for (; b + R <= b1; b += R) {
      int64_t o = ob;
      for (; o + C <= oe; o += C) tile.template run<R, C>(b, o);
      for (; o < oe; ++o) tile.template run<R, 1>(b, o);
    }
    for (; b < b1; ++b) {
      int64_t o = ob;
      for (; o + C <= oe; o += C) tile.template run<1, C>(b, o);
      for (; o < oe; ++o) tile.template run<1, 1>(b, o);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// p = inf: max |x - w| with the first arg-max.
//
// With the arg-max, the per-lane running maximum is stored after every chunk of KCH vectors (one store per
// pair and chunk, to a small per-thread buffer). At the end: the first chunk whose running maximum reaches
// y contains the first maximiser; only that chunk (64 elements) is rescanned, restricted to the lanes that
// reach y there (exact equality: the same subtraction and |.| redone on the same floats). The search and
// the rescan are branch-free: with branches, mispredictions cost more than the whole tile loop at n ~ 256.
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
    // cm[ch] = per-lane running maximum after chunk ch (monotone in ch).
    const int64_t nch = (nsteps + KCH - 1) / KCH;
    float* cm = chunk_scratch(size_t(nch) * R * C * W);
    vf acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = splat(0.f);
    const int64_t nfullch = nv / KCH;
    for (int64_t ch = 0; ch < nfullch; ++ch) {
      for (int k = 0; k < KCH; ++k) step<R, C, false>(acc, xp, wp, n, (ch * KCH + k) * W, 0);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) st(cm + ((ch * R + r) * C + c) * W, acc[r][c]);
    }
    if (nfullch < nch) {
      for (int64_t s = nfullch * KCH; s < nv; ++s) step<R, C, false>(acc, xp, wp, n, s * W, 0);
      if (tail) step<R, C, true>(acc, xp, wp, n, nv * W, tail);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) st(cm + ((nfullch * R + r) * C + c) * W, acc[r][c]);
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        const float m = hmax(acc[r][c]);
        const vf mm = splat(m);
        // First chunk whose running max reaches m = number of chunks before it (monotone): branch-free.
        int64_t ch = 0;
        for (int64_t k = 0; k < nch; ++k) ch += lane_bits(ld(cm + ((k * R + r) * C + c) * W) == mm) == 0;
        const uint32_t lanes = lane_bits(ld(cm + ((ch * R + r) * C + c) * W) == mm);
        // Rescan that chunk's KCH * W = 64 elements into one bit mask (bit j <-> element ch*KCH*W + j).
        const float* xr = xp + r * n;
        const float* wr = wp + c * n;
        uint64_t hits = 0;
        const int64_t s0 = ch * KCH;
        if (s0 + KCH <= nv) {
          for (int k = 0; k < KCH; ++k) {
            const int64_t i0 = (s0 + k) * W;
            hits |= uint64_t(lane_bits(vabs(ld(xr + i0) - ld(wr + i0)) == mm) & lanes) << (k * W);
          }
        } else {
          for (int64_t s = s0; s < nsteps; ++s) {
            const int64_t i0 = s * W;
            const vf xv = s < nv ? ld(xr + i0) : ld_part(xr + i0, tail, 0.f);
            const vf wv = s < nv ? ld(wr + i0) : ld_part(wr + i0, tail, 0.f);
            hits |= uint64_t(lane_bits(vabs(xv - wv) == mm) & lanes) << ((s - s0) * W);
          }
        }
        const int64_t found = hits ? s0 * W + __builtin_ctzll(hits) : -1;
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
inline float lp_pair_double(const float* xr, const float* wr, int64_t n, double p) {
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
// below 2^FLUSH_LOG2 (relative to the max term, which is 1) flushed to exactly 0; y = m S^(1/p).
// (Lower degrees would be ~8% faster here, but for p <= PRECISE_P the backward trusts y, and y's error
// reaches the gradients multiplied by p - 1.)
template <bool SKIP>
double pow_sum_pair(const float* xr, const float* wr, int64_t n, float z, float p, float tmin) {
  const vf vz = splat(z), vp = splat(p), vt = splat(tmin);
  vf acc = splat(0.f);
  const int64_t nv = n / W;
  const int tail = int(n % W);
  for (int64_t s = 0; s < nv; ++s) {
    const vf t = vabs(ld(xr + s * W) - ld(wr + s * W)) * vz;
    const vi keep = t > vt;
    if (SKIP && !any(keep)) continue;  // every term negligible: the usual case at large p
    vf f;
    acc += vand(vexp2(vlog2<7>(t, f) * vp), keep);
  }
  if (tail) {
    const vf t = vabs(ld_part(xr + nv * W, tail, 0.f) - ld_part(wr + nv * W, tail, 0.f)) * vz;
    vf f;
    acc += vand(vexp2(vlog2<7>(t, f) * vp), t > vt);
  }
  return hsum(acc);
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
};

// Exact small-integer coefficient: (d z)^(P-1) with the sign of d (sign(0) = +1 for P = 1).
template <int P>
struct IntCoef {
  static constexpr int K = 8;          // vectors per column chunk
  static constexpr bool HEAVY = false;  // cheap: the chunk of x and grad_x stays in registers (mostly)
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

// General p: c = 2^((p-1) log2(|d| z) + A), flushed to 0 where (|d| z)^(p-1) < 2^FLUSH_LOG2.
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
  static constexpr int K = 8;         // ~40 instructions per vector: amortise the per-pair overhead,
  static constexpr bool HEAVY = true;  // staging the chunk of x and grad_x in L1 rather than registers
  vf pm1, tmin;
  bool skip;  // large p: test the whole chunk of the pair first, most are entirely negligible
  vf tprec;   // precise path: below this t every coefficient of the vector is small enough for plain
  inline vf operator()(vf xv, vf wv, const PairParams& q) const {
    vf t, l;
    if constexpr (PRECISE) {
      const vf tt = vabs(xv - wv) * q.z;
      if (any(tt > tprec)) {
        l = log2_dz<true>(xv, wv, q.z, t);
      } else {
        vf f;
        t = tt;
        l = vlog2<7>(tt, f);
      }
    } else {
      l = log2_dz<false>(xv, wv, q.z, t);
    }
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

// Loop nest of one column chunk (CW = K*W columns): for each block of OB outputs, the block's weights are
// packed into a contiguous zero-padded buffer (rows of w are 4 KiB apart at n_in = 1024, which would make
// every row of the block collide in the same L1 set) and its grad_w rows accumulate in a packed buffer
// too; the batch is swept inside, each row's grad_x chunk accumulating in registers over the block.
// grad_x[b, chunk] is the sum over blocks in ascending order, grad_w[o, chunk] the sum over b ascending.
inline float* bwd_scratch(size_t nfloats) {
  thread_local std::vector<float> buf;
  if (buf.size() < nfloats) buf.resize(nfloats);
  return buf.data();
}

template <class Coef, bool NX, bool NW>
void bwd_chunks(const float* x, const float* w, const float* g, const float* zb, const float* ab, const float* y,
                int64_t B, int64_t N, int64_t n, float* gx, float* gw, const Coef& coef) {
  constexpr int K = Coef::K;
  constexpr int CW = K * W;
  constexpr int64_t OB = (16 << 10) / (CW * 4 * 2);  // packed w + grad_w block: 16 KiB
  const int64_t nch = (n + CW - 1) / CW;
  parallel_tasks(nch, B * N * n, [&](int64_t ch) {
    FtzGuard ftz;
    float* wloc = bwd_scratch(size_t(2 * OB * CW));
    float* gwloc = wloc + OB * CW;
    {
      const int64_t i0 = ch * CW;
      const int len = int(std::min<int64_t>(CW, n - i0));
      for (int64_t ob = 0; ob < N; ob += OB) {
        const int64_t nb = std::min<int64_t>(OB, N - ob);
        for (int64_t j = 0; j < nb; ++j) {
          const float* src = w + (ob + j) * n + i0;
          float* dst = wloc + j * CW;
          if (len == CW) {
            for (int k = 0; k < K; ++k) st(dst + k * W, ld(src + k * W));
          } else {
            for (int i = 0; i < CW; ++i) dst[i] = i < len ? src[i] : 0.f;
          }
          if (NW) std::fill(gwloc + j * CW, gwloc + (j + 1) * CW, 0.f);
        }
        for (int64_t b = 0; b < B; ++b) {
          const float* xr = x + b * n + i0;
          vf xv[K], acc[K];
          if (len == CW) {
            for (int k = 0; k < K; ++k) xv[k] = ld(xr + k * W);
          } else {
            float tmp[CW];
            for (int i = 0; i < CW; ++i) tmp[i] = i < len ? xr[i] : 0.f;
            for (int k = 0; k < K; ++k) xv[k] = ld(tmp + k * W);
          }
          for (int k = 0; k < K; ++k) acc[k] = splat(0.f);
          alignas(64) float xl[Coef::HEAVY ? CW : 1], al[Coef::HEAVY ? CW : 1];
          if constexpr (Coef::HEAVY)
            for (int k = 0; k < K; ++k) {
              st(xl + k * W, xv[k]);
              st(al + k * W, acc[k]);
            }
          const float* zrow = zb + b * N + ob;
          const float* grow = g + b * N + ob;
          for (int64_t j = 0; j < nb; ++j) {
            const float zs = zrow[j];
            if (zs == 0.f) continue;
            const float gs = grow[j];
            if (zs < 0.f) {  // double-precision path for pairs whose y is outside [2^-100, 2^100]
              const float* wr = w + (ob + j) * n + i0;
              const double yv = y[b * N + ob + j];
              const double av = ab ? ab[b * N + ob + j] : 0.0;
              float tmp[CW] = {};
              for (int i = 0; i < len; ++i)
                tmp[i] = float(double(gs) * coef.scalar(double(xr[i]) - double(wr[i]), yv, av));
              for (int k = 0; k < K; ++k) {
                if constexpr (Coef::HEAVY)
                  st(al + k * W, ld(al + k * W) + ld(tmp + k * W));
                else
                  acc[k] += ld(tmp + k * W);
                if (NW) st(gwloc + j * CW + k * W, ld(gwloc + j * CW + k * W) - ld(tmp + k * W));
              }
              continue;
            }
            PairParams q;
            q.z = splat(zs);
            q.g = splat(gs);
            q.a = splat(ab ? ab[b * N + ob + j] : 0.f);
            const float* wj = wloc + j * CW;
            float* gj = gwloc + j * CW;
            if constexpr (Coef::HEAVY) {
              if (coef.skip) {
                vi keep = splati(0);
                for (int k = 0; k < K; ++k) keep |= vabs(ld(xl + k * W) - ld(wj + k * W)) * q.z > coef.tmin;
                if (!any(keep)) continue;
              }
              for (int k = 0; k < K; ++k) {
                const vf cg = coef(ld(xl + k * W), ld(wj + k * W), q);
                st(al + k * W, ld(al + k * W) + cg);
                if (NW) st(gj + k * W, ld(gj + k * W) - cg);
              }
            } else {
              for (int k = 0; k < K; ++k) {
                const vf cg = coef(xv[k], ld(wj + k * W), q);
                acc[k] += cg;
                if (NW) st(gj + k * W, ld(gj + k * W) - cg);
              }
            }
          }
          if constexpr (Coef::HEAVY)
            for (int k = 0; k < K; ++k) acc[k] = ld(al + k * W);
          if (NX) {
            float* gxr = gx + b * n + i0;
            if (len == CW) {
              for (int k = 0; k < K; ++k) st(gxr + k * W, ob == 0 ? acc[k] : ld(gxr + k * W) + acc[k]);
            } else {
              float tmp[CW];
              for (int k = 0; k < K; ++k) st(tmp + k * W, acc[k]);
              for (int i = 0; i < len; ++i) gxr[i] = ob == 0 ? tmp[i] : gxr[i] + tmp[i];
            }
          }
        }
        if (NW)
          for (int64_t j = 0; j < nb; ++j) std::copy(gwloc + j * CW, gwloc + j * CW + len, gw + (ob + j) * n + i0);
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

// Precise pre-pass (p > PRECISE_P): sum_j (|d_j| z)^p with the precise log2, for A = -(p-1)/p log2(sum).
template <bool SKIP>
double precise_sum_pair(const float* xr, const float* wr, int64_t n, float z, float p, float tmin, float tprec) {
  const vf vz = splat(z), vp = splat(p), vt = splat(tmin), vprec = splat(tprec);
  vf acc = splat(0.f);
  const int64_t nv = n / W;
  const int tail = int(n % W);
  for (int64_t s = 0; s < nv; ++s) {
    const vf xv = ld(xr + s * W), wv = ld(wr + s * W);
    const vf tt = vabs(xv - wv) * vz;
    if (SKIP && !any(tt > vt)) continue;
    vf t, l;
    if (any(tt > vprec)) {
      l = log2_dz<true>(xv, wv, vz, t);
    } else {  // small terms only: plain precision is enough (see precise_threshold)
      vf f;
      t = tt;
      l = vlog2<7>(tt, f);
    }
    acc += vand(vexp2(l * vp), t > vt);
  }
  if (tail) {
    vf t;
    const vf l = log2_dz<true>(ld_part(xr + nv * W, tail, 0.f), ld_part(wr + nv * W, tail, 0.f), vz, t);
    acc += vand(vexp2(l * vp), t > vt);
  }
  return hsum(acc);
}

// Terms (forward) and coefficients (backward) below 2^-48 of the largest one (which is 1) are flushed to
// exactly 0: even 2^16 of them change a float32 sum by less than its rounding. (The reference flushes
// below 2^-60.) At large p nearly every term is that small, and whole vectors of them are skipped.
constexpr double FLUSH_LOG2 = -48.0;
// From this p on, testing for (and skipping) all-negligible vectors pays for its branch mispredictions on
// typical data; below it nearly every vector has a relevant term and the test is pure overhead (measured on
// N(0, 1) data: ~3% slower at p = 64, ~3x faster at p = 1000).
#ifndef CB_SKIP_P
#define CB_SKIP_P 96.0
#endif
constexpr double SKIP_P = CB_SKIP_P;

inline float tmin_for(double e) {  // smallest t with t^e >= 2^FLUSH_LOG2 (and t a normal float)
  const double t = std::exp2(FLUSH_LOG2 / e);
  return float(std::max<double>(t, FLT_MIN_NORMAL));
}

// The precise large-p arithmetic is needed only where a term is large: the plain one's relative error is
// < e 2^-22 per term t^e (|x - w| rounding, the log2), so terms below t0^e, t0 = 2^(-(2 + log2(e) +
// log2(count)) / e), add up to less than 2^-24 of the largest term (1) over `count` of them. Vectors with
// no lane above t0 take the plain path (at p = 64: t0 ~ 0.82; on typical data few vectors reach it).
inline float precise_threshold(double e, int64_t count) {
  const double t = std::exp2(-(2.0 + std::log2(e) + std::log2(double(std::max<int64_t>(count, 1)))) / e);
  return float(std::min(t, 1.0));
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
  constexpr int64_t ROWS = 16;  // rows (of grad_x or grad_w) per task
  if (gx) {
    parallel_tasks((B + ROWS - 1) / ROWS, B * N * 8, [&](int64_t task) {
      for (int64_t b = task * ROWS; b < std::min(B, task * ROWS + ROWS); ++b) {
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
    parallel_tasks((N + ROWS - 1) / ROWS, B * N * 8, [&](int64_t task) {
      const int64_t o0 = task * ROWS, o1 = std::min(N, o0 + ROWS);
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
  int64_t nslow = 0;
  for (const uint8_t v : slow) nslow += v;
  if (nslow == 0) return;
  parallel_tasks(B, nslow * n * 16, [&](int64_t b) {  // (the double path costs ~16 fast pairs per pair)
    for (int64_t o = 0; o < N; ++o)
      if (slow[b * N + o]) y[b * N + o] = lp_pair_double(x + b * n, w + o * n, n, P);
  });
}

inline bool small_int_p(double p) { return p == std::floor(p) && p >= 1.0 && p <= 8.0; }

inline bool needs_offsets(double p) { return !small_int_p(p) && p > PRECISE_P; }

// A = -(p-1)/p log2(sum_j (|d_j| / y)^p) in double precision, for the pairs outside the scaling range.
inline float offset_double(const float* xr, const float* wr, int64_t n, double yv, double p) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double t = std::fabs(double(xr[i]) - double(wr[i])) / yv;
    if (t > 0.0) s += std::pow(t, p);
  }
  return (s > 0.0 && std::isfinite(s)) ? float(-(p - 1.0) / p * std::log2(s)) : 0.f;
}

// zs, as: (B, N) per-pair state for the backward, written where needs_offsets(p) (else untouched, may be
// null): the scale z = 1/m and the offset A = -(p-1)/p log2(sum_j (|d_j| z)^p) of the precise large-p
// backward (see PowCoef). The power sum is computed here with the precise arithmetic anyway (it is y's
// sum), so handing (z, A) on saves the backward a whole pass of logs and exps over every pair.
inline void lp_forward(const float* xp, const float* wp, int64_t B, int64_t N, int64_t n, double p, float* yp,
                       float* zs, float* as) {
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
  const bool precise = needs_offsets(p);
  const float pf = float(p);
  const float tmin = tmin_for(p);
  const float tprec = precise ? precise_threshold(p, n) : 0.f;
  parallel_tasks(B, B * N * n, [&](int64_t b) {
    FtzGuard ftz;
    for (int64_t o = 0; o < N; ++o) {
      const int64_t k = b * N + o;
      const float* xr = xp + b * n;
      const float* wr = wp + o * n;
      const double m = yp[k];
      if (m == 0.0) {
        if (precise) zs[k] = as[k] = 0.f;  // zero distance: zero subgradient
        continue;
      }
      if (!in_scaling_range(m)) {
        yp[k] = lp_pair_double(xr, wr, n, p);
        if (precise) {
          zs[k] = -1.f;  // the backward's double-precision path
          as[k] = offset_double(xr, wr, n, yp[k], p);
        }
        continue;
      }
      const float z = float(1.0 / m);
      double s;
      if (precise)
        s = p >= SKIP_P ? precise_sum_pair<true>(xr, wr, n, z, pf, tmin, tprec)
                        : precise_sum_pair<false>(xr, wr, n, z, pf, tmin, tprec);
      else
        s = pow_sum_pair<false>(xr, wr, n, z, pf, tmin);
      yp[k] = float(m * std::exp2(std::log2(s) / p));
      if (precise) {
        zs[k] = z;
        as[k] = (s > 0.0 && std::isfinite(s)) ? float(-(p - 1.0) / p * std::log2(s)) : 0.f;
      }
    }
  });
}

// zb, ab: (B, N) scratch (ab only where needs_offsets(p), else may be null). gx / gw may be null (not needed).
// zs, as: the forward's per-pair state (see lp_forward) where needs_offsets(p), or null: then the backward
// computes it itself, with z = 1/y, in a pre-pass as costly as the forward's power sums.
inline void lp_backward(const float* xp, const float* wp, const float* yp, const float* gp, int64_t B, int64_t N,
                        int64_t n, double p, float* gxp, float* gwp, float* zb, float* ab, const float* zs,
                        const float* as) {
  const bool is_int = small_int_p(p);
  const bool precise = needs_offsets(p);
  const bool saved = precise && zs != nullptr;
  if (!precise) ab = nullptr;
  const float tmin_pre = tmin_for(p);
  const float tprec_pre = precise ? precise_threshold(p, n) : 0.f;
  const bool prepass = precise && !saved;
  parallel_tasks(B, prepass ? B * N * n : B * N, [&](int64_t b) {  // (without the pre-pass: a cheap loop)
    FtzGuard ftz;
    for (int64_t o = 0; o < N; ++o) {
      const int64_t k = b * N + o;
      const double yv = yp[k];
      float z;
      if (gp[k] == 0.f)
        z = 0.f;  // contributes nothing
      else if (saved)
        z = zs[k];
      else if (p == 1.0)
        z = 1.f;  // coefficient sign(d), y unused
      else if (yv == 0.0)
        z = 0.f;  // zero distance: zero subgradient (as the reference)
      else if (in_scaling_range(yv))
        z = float(1.0 / yv);
      else
        z = -1.f;
      zb[k] = z;
      if (!precise) continue;
      if (saved || z == 0.f) {
        ab[k] = saved ? as[k] : 0.f;
        continue;
      }
      const float* xr = xp + b * n;
      const float* wr = wp + o * n;
      if (z < 0.f) {
        ab[k] = offset_double(xr, wr, n, yv, p);
        continue;
      }
      const double s = p >= SKIP_P ? precise_sum_pair<true>(xr, wr, n, z, float(p), tmin_pre, tprec_pre)
                                   : precise_sum_pair<false>(xr, wr, n, z, float(p), tmin_pre, tprec_pre);
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
    const float tprec = precise_threshold(p - 1.0, std::max(B, N));
    PowCoef<true> c{splat(float(p - 1.0)), splat(tmin_for(p - 1.0)), p >= SKIP_P, splat(tprec), p};
    bwd_dispatch(nx, nw, xp, wp, gp, zb, ab, yp, B, N, n, gxp, gwp, c);
  } else {
    PowCoef<false> c{splat(float(p - 1.0)), splat(tmin_for(p - 1.0)), p >= SKIP_P, splat(0.f), p};
    bwd_dispatch(nx, nw, xp, wp, gp, zb, nullptr, yp, B, N, n, gxp, gwp, c);
  }
}

}  // namespace cb
