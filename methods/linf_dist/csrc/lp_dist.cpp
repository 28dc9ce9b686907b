// Torch bindings of the fused CPU lp-distance kernels (kernels.h). Design notes and measurements:
// methods/linf_dist/kernels/cpu.py. Semantics: methods/linf_dist/reference.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

namespace cb {
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
}  // namespace cb

#include "kernels.h"

using at::Tensor;

namespace {

void check_2d(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensor expected");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, ": float32 expected");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), what, ": contiguous 2-d tensor expected");
}

void check_xw(const Tensor& x, const Tensor& w) {
  check_2d(x, "x");
  check_2d(w, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w must have the same number of columns");
}

void check_out(const Tensor& t, const Tensor& x, const Tensor& w, const char* what) {
  check_2d(t, what);
  TORCH_CHECK(t.size(0) == x.size(0) && t.size(1) == w.size(0), what, ": shape must be (B, n_out)");
}

}  // namespace

bool all_finite(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "all_finite: contiguous float32 expected");
  return cb::all_finite(t.data_ptr<float>(), t.numel());
}

std::vector<Tensor> linf_forward(const Tensor& x, const Tensor& w, bool with_idx) {
  check_xw(x, w);
  const int64_t B = x.size(0), N = w.size(0), n = x.size(1);
  Tensor y = at::empty({B, N}, x.options());
  Tensor idx = with_idx ? at::empty({B, N}, x.options().dtype(at::kLong)) : Tensor();
  cb::linf_forward(x.data_ptr<float>(), w.data_ptr<float>(), B, N, n, y.data_ptr<float>(),
                   with_idx ? idx.data_ptr<int64_t>() : nullptr);
  return {y, idx};
}

std::vector<Tensor> linf_backward(const Tensor& x, const Tensor& w, const Tensor& idx, const Tensor& g, bool need_x,
                                  bool need_w) {
  check_xw(x, w);
  check_out(g, x, w, "grad");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() == 2 && idx.size(0) == x.size(0) &&
                  idx.size(1) == w.size(0),
              "idx: contiguous int64 (B, n_out) expected");
  const int64_t B = x.size(0), N = w.size(0), n = x.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < B * N; ++k) TORCH_CHECK(ip[k] >= 0 && ip[k] < n, "linf_backward: index out of range");
  Tensor gx = need_x ? at::empty_like(x) : Tensor();
  Tensor gw = need_w ? at::empty_like(w) : Tensor();
  cb::linf_backward(x.data_ptr<float>(), w.data_ptr<float>(), ip, g.data_ptr<float>(), B, N, n,
                    need_x ? gx.data_ptr<float>() : nullptr, need_w ? gw.data_ptr<float>() : nullptr);
  return {gx, gw};
}

std::vector<Tensor> linf_interval(const Tensor& l, const Tensor& u, const Tensor& w) {
  check_xw(l, w);
  check_xw(u, w);
  TORCH_CHECK(l.sizes() == u.sizes(), "interval ends must have the same shape");
  const int64_t B = l.size(0), N = w.size(0), n = l.size(1);
  Tensor lo = at::empty({B, N}, l.options());
  Tensor hi = at::empty({B, N}, l.options());
  cb::linf_interval(l.data_ptr<float>(), u.data_ptr<float>(), w.data_ptr<float>(), B, N, n, lo.data_ptr<float>(),
                    hi.data_ptr<float>());
  return {lo, hi};
}

Tensor lp_forward(const Tensor& x, const Tensor& w, double p) {
  check_xw(x, w);
  TORCH_CHECK(p >= 1.0 && std::isfinite(p), "lp_forward: finite p >= 1 expected");
  const int64_t B = x.size(0), N = w.size(0), n = x.size(1);
  Tensor y = at::empty({B, N}, x.options());
  cb::lp_forward(x.data_ptr<float>(), w.data_ptr<float>(), B, N, n, p, y.data_ptr<float>());
  return y;
}

std::vector<Tensor> lp_backward(const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& g, double p,
                                bool need_x, bool need_w) {
  check_xw(x, w);
  check_out(y, x, w, "y");
  check_out(g, x, w, "grad");
  TORCH_CHECK(p >= 1.0 && std::isfinite(p), "lp_backward: finite p >= 1 expected");
  const int64_t B = x.size(0), N = w.size(0), n = x.size(1);
  Tensor gx = need_x ? at::empty_like(x) : Tensor();
  Tensor gw = need_w ? at::zeros_like(w) : Tensor();
  if (!need_x && !need_w) return {gx, gw};
  Tensor zb = at::empty({B, N}, x.options());
  Tensor ab = cb::needs_offsets(p) ? at::empty({B, N}, x.options()) : Tensor();
  cb::lp_backward(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), g.data_ptr<float>(), B, N, n, p,
                  need_x ? gx.data_ptr<float>() : nullptr, need_w ? gw.data_ptr<float>() : nullptr,
                  zb.data_ptr<float>(), ab.defined() ? ab.data_ptr<float>() : nullptr);
  return {gx, gw};
}

int vec_width() { return cb::W; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("all_finite", &all_finite, nogil());
  m.def("linf_forward", &linf_forward, nogil());
  m.def("linf_backward", &linf_backward, nogil());
  m.def("linf_interval", &linf_interval, nogil());
  m.def("lp_forward", &lp_forward, nogil());
  m.def("lp_backward", &lp_backward, nogil());
  m.def("vec_width", &vec_width);
}
