// Fused CPU steps of the bound engine: the ReLU relaxation and the final concretisation of the CROWN backward
// pass, and the interval (IBP) step through a ReLU (methods/bounds/fused.py says when they are used and why).
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

// IBP through a ReLU, from the centre C and radius R of the box of its input (an affine layer's image) to the
// centre and radius of the box of its output: l = C − R, u = C + R, then (relu(u) + relu(l))·½ and
// (relu(u) − relu(l))·½. These are the operations of the torch formulation (functional.interval_relu) in
// the same order, so the results are equal bit for bit. relu keeps NaN, as torch's does.
inline float relu(float v) { return v < 0.0f ? 0.0f : v; }

void interval_relu_forward(ptr centre_p, ptr radius_p, int64_t N, ptr out_centre_p, ptr out_radius_p) {
  const float *centre = cf(centre_p), *radius = cf(radius_p);
  float *out_centre = mf(out_centre_p), *out_radius = mf(out_radius_p);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float lower = relu(centre[n] - radius[n]), upper = relu(centre[n] + radius[n]);
      out_centre[n] = (upper + lower) * 0.5f;
      out_radius[n] = (upper - lower) * 0.5f;
    }
  });
}

// Its gradients, as autograd composes them for the torch formulation: each end's gradient ½g_c ± ½g_r where
// that end's relu output is positive (threshold_backward keeps NaN's gradient, as here) and 0 elsewhere;
// then g_C = g_u + g_l and g_R = g_u − g_l. Every sum has two terms, so its order cannot change the result.
void interval_relu_backward(ptr centre_p, ptr radius_p, ptr grad_centre_p, ptr grad_radius_p, int64_t N,
                            ptr out_centre_p, ptr out_radius_p) {
  const float *centre = cf(centre_p), *radius = cf(radius_p);
  const float *grad_centre = cf(grad_centre_p), *grad_radius = cf(grad_radius_p);
  float *out_centre = mf(out_centre_p), *out_radius = mf(out_radius_p);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float half_centre = grad_centre[n] * 0.5f, half_radius = grad_radius[n] * 0.5f;
      const float grad_upper = centre[n] + radius[n] <= 0.0f ? 0.0f : half_centre + half_radius;
      const float grad_lower = centre[n] - radius[n] <= 0.0f ? 0.0f : half_centre - half_radius;
      out_centre[n] = grad_upper + grad_lower;
      out_radius[n] = grad_upper - grad_lower;
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
  m.def("interval_relu_forward", &interval_relu_forward, nogil());
  m.def("interval_relu_backward", &interval_relu_backward, nogil());
}
