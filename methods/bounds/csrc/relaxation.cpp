// Fused CPU steps of the CROWN backward pass (methods/bounds/fused.py says when they are used and why).
//
// Coefficients lam are (B, S, N) float32 rows, contiguous; per-neuron vectors (B, N). Every coefficient
// produced is one rounded product, exactly as in the torch formulation (methods/bounds/functional.py);
// only the order of the terms of a sum differs. Each output element or row is computed by one fixed
// sequence of operations, whatever the thread count. Compiled with -ffp-contract=off: no fused multiply-add.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace {

using ptr = uintptr_t;
inline const float* cf(ptr p) { return reinterpret_cast<const float*>(p); }
inline float* mf(ptr p) { return reinterpret_cast<float*>(p); }

// Partial sums in this many lanes, so that the compiler can vectorise a reduction without reassociating
// floating-point additions on its own.
constexpr int64_t LANES = 16;

inline float lane_sum(const float* part) {
  float total = 0.0f;
  for (int64_t k = 0; k < LANES; ++k) total += part[k];
  return total;
}

// lam_in = lam · lower_slope where lam ≥ 0, lam · upper_slope where lam < 0;
// offset[b, s] = Σ_n min(lam, 0) · intercept.
void relu_forward(ptr lam_p, ptr lower_p, ptr upper_p, ptr intercept_p, int64_t B, int64_t S, int64_t N,
                  ptr out_p, ptr offset_p) {
  const float *lam = cf(lam_p), *lower = cf(lower_p), *upper = cf(upper_p), *intercept = cf(intercept_p);
  float *out = mf(out_p), *offset = mf(offset_p);
  at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S;
      const float *l = lam + r * N, *al = lower + b * N, *au = upper + b * N, *ic = intercept + b * N;
      float* o = out + r * N;
      float part[LANES] = {0};
      int64_t n = 0;
      for (; n + LANES <= N; n += LANES) {
        for (int64_t k = 0; k < LANES; ++k) {
          const float v = l[n + k];
          const float negative = v < 0.0f ? v : 0.0f;
          o[n + k] = v * (v >= 0.0f ? al[n + k] : au[n + k]);
          part[k] += negative * ic[n + k];
        }
      }
      for (int64_t k = 0; n < N; ++n, ++k) {
        const float v = l[n];
        const float negative = v < 0.0f ? v : 0.0f;
        o[n] = v * (v >= 0.0f ? al[n] : au[n]);
        part[k] += negative * ic[n];
      }
      offset[r] = lane_sum(part);
    }
  });
}

// Gradients of relu_forward: grad_lam = g · lower_slope where lam ≥ 0, g · upper_slope + g_off · intercept
// where lam < 0; grad_upper[b, n] = Σ_s g · min(lam, 0); grad_intercept[b, n] = Σ_s g_off · min(lam, 0).
// A zero pointer skips that output. Threads split the batch, so each b's sums over s run in order s = 0..S−1.
void relu_backward(ptr lam_p, ptr lower_p, ptr upper_p, ptr intercept_p, ptr grad_p, ptr grad_offset_p,
                   int64_t B, int64_t S, int64_t N, ptr grad_lam_p, ptr grad_upper_p, ptr grad_intercept_p) {
  const float *lam = cf(lam_p), *lower = cf(lower_p), *upper = cf(upper_p), *intercept = cf(intercept_p);
  const float *grad = cf(grad_p), *grad_offset = cf(grad_offset_p);
  float *grad_lam = mf(grad_lam_p), *grad_upper = mf(grad_upper_p), *grad_intercept = mf(grad_intercept_p);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float *al = lower + b * N, *au = upper + b * N, *ic = intercept + b * N;
      float* gu = grad_upper ? grad_upper + b * N : nullptr;
      float* gi = grad_intercept ? grad_intercept + b * N : nullptr;
      for (int64_t n = 0; n < N && gu; ++n) gu[n] = 0.0f;
      for (int64_t n = 0; n < N && gi; ++n) gi[n] = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t r = b * S + s;
        const float *l = lam + r * N, *g = grad + r * N;
        const float go = grad_offset[r];
        if (grad_lam) {
          float* out = grad_lam + r * N;
          for (int64_t n = 0; n < N; ++n) {
            const float v = l[n];
            out[n] = v >= 0.0f ? g[n] * al[n] : g[n] * au[n] + go * ic[n];
          }
        }
        if (gu) {
          for (int64_t n = 0; n < N; ++n) gu[n] += g[n] * (l[n] < 0.0f ? l[n] : 0.0f);
        }
        if (gi) {
          for (int64_t n = 0; n < N; ++n) gi[n] += go * (l[n] < 0.0f ? l[n] : 0.0f);
        }
      }
    }
  });
}

// out[b, s] = Σ_n lam · centre − Σ_n |lam| · radius: the minimum of lam · x over the box, lam (B, S, N).
void concretize_forward(ptr lam_p, ptr centre_p, ptr radius_p, int64_t B, int64_t S, int64_t N, ptr out_p) {
  const float *lam = cf(lam_p), *centre = cf(centre_p), *radius = cf(radius_p);
  float* out = mf(out_p);
  at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S;
      const float *l = lam + r * N, *c = centre + b * N, *rad = radius + b * N;
      float linear[LANES] = {0}, spread[LANES] = {0};
      int64_t n = 0;
      for (; n + LANES <= N; n += LANES) {
        for (int64_t k = 0; k < LANES; ++k) {
          const float v = l[n + k];
          linear[k] += v * c[n + k];
          spread[k] += (v < 0.0f ? -v : v) * rad[n + k];
        }
      }
      for (int64_t k = 0; n < N; ++n, ++k) {
        const float v = l[n];
        linear[k] += v * c[n];
        spread[k] += (v < 0.0f ? -v : v) * rad[n];
      }
      out[r] = lane_sum(linear) - lane_sum(spread);
    }
  });
}

// The gradient of concretize_forward in lam: g[b, s] · (centre − radius · sign(lam)), sign(0) = 0.
void concretize_backward(ptr lam_p, ptr centre_p, ptr radius_p, ptr grad_p, int64_t B, int64_t S, int64_t N,
                         ptr grad_lam_p) {
  const float *lam = cf(lam_p), *centre = cf(centre_p), *radius = cf(radius_p), *grad = cf(grad_p);
  float* grad_lam = mf(grad_lam_p);
  at::parallel_for(0, B * S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S;
      const float *l = lam + r * N, *c = centre + b * N, *rad = radius + b * N;
      const float g = grad[r];
      float* out = grad_lam + r * N;
      for (int64_t n = 0; n < N; ++n) {
        const float v = l[n];
        const float shifted = v > 0.0f ? c[n] - rad[n] : (v < 0.0f ? c[n] + rad[n] : c[n]);
        out[n] = shifted * g;
      }
    }
  });
}

}  // namespace

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("relu_forward", &relu_forward, nogil());
  m.def("relu_backward", &relu_backward, nogil());
  m.def("concretize_forward", &concretize_forward, nogil());
  m.def("concretize_backward", &concretize_backward, nogil());
}
