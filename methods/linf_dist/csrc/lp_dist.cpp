// Python bindings of the fused CPU lp-distance kernels (kernels.h). Design notes and measurements:
// methods/linf_dist/kernels/cpu.py; semantics: methods/linf_dist/reference.py.
//
// The functions take raw data pointers and sizes: the Python side (kernels/cpu.py) checks dtypes, shapes
// and contiguity and allocates every tensor. That keeps torch's heavy C++ headers out of this file (only
// ATen/Parallel.h, for at::parallel_for, and pybind11), so the first-use build is short.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace cb {
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
inline int num_threads() { return at::get_num_threads(); }
}  // namespace cb

#include "kernels.h"

namespace py = pybind11;

namespace {
using ptr = uintptr_t;
inline const float* cf(ptr p) { return reinterpret_cast<const float*>(p); }
inline float* mf(ptr p) { return reinterpret_cast<float*>(p); }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("vec_width", [] { return cb::W; });
  m.def(
      "all_finite", [](ptr p, int64_t n) { return cb::all_finite(cf(p), n); }, nogil());
  m.def(
      "linf_forward",
      [](ptr x, ptr w, int64_t B, int64_t N, int64_t n, ptr y, ptr idx) {
        cb::linf_forward(cf(x), cf(w), B, N, n, mf(y), reinterpret_cast<int64_t*>(idx));
      },
      nogil());
  m.def(
      "linf_backward",
      [](ptr x, ptr w, ptr idx, ptr g, int64_t B, int64_t N, int64_t n, ptr gx, ptr gw) {
        const int64_t* ip = reinterpret_cast<const int64_t*>(idx);
        for (int64_t k = 0; k < B * N; ++k)
          if (ip[k] < 0 || ip[k] >= n) return false;
        cb::linf_backward(cf(x), cf(w), ip, cf(g), B, N, n, mf(gx), mf(gw));
        return true;
      },
      nogil());
  m.def(
      "linf_interval",
      [](ptr l, ptr u, ptr w, int64_t B, int64_t N, int64_t n, ptr lo, ptr hi) {
        cb::linf_interval(cf(l), cf(u), cf(w), B, N, n, mf(lo), mf(hi));
      },
      nogil());
  m.def(
      "lp_forward",
      [](ptr x, ptr w, int64_t B, int64_t N, int64_t n, double p, ptr y, ptr zs, ptr as) {
        cb::lp_forward(cf(x), cf(w), B, N, n, p, mf(y), mf(zs), mf(as));
      },
      nogil());
  m.def("needs_offsets", &cb::needs_offsets);
  m.def(
      "lp_backward",
      [](ptr x, ptr w, ptr y, ptr g, int64_t B, int64_t N, int64_t n, double p, ptr gx, ptr gw, ptr zb, ptr ab,
         ptr zs, ptr as) {
        cb::lp_backward(cf(x), cf(w), cf(y), cf(g), B, N, n, p, mf(gx), mf(gw), mf(zb), mf(ab), cf(zs), cf(as));
      },
      nogil());
}
