// Fused elementwise ops for CPU. In eager PyTorch each is 5-10 separate ops (and as many passes over
// memory and dispatches); for a small model's decode step that overhead is most of the non-GEMM time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename T>
void add_rms_norm_kernel(T* x, T* residual, const T* weight, int64_t rows, int64_t dim, float eps, bool add) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> r(dim);
    for (int64_t i = begin; i < end; ++i) {
      T* xi = x + i * dim;
      T* ri = residual + i * dim;
      float sumsq = 0.f;
      for (int64_t j = 0; j < dim; ++j) {
        float v = static_cast<float>(xi[j]);
        if (add) {
          v += static_cast<float>(ri[j]);
          ri[j] = static_cast<T>(v);
          v = static_cast<float>(ri[j]);  // normalize what the residual stream holds, as unfused code does
        }
        r[j] = v;
        sumsq += v * v;
      }
      const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(dim) + eps);
      for (int64_t j = 0; j < dim; ++j)
        xi[j] = static_cast<T>(static_cast<float>(weight[j]) * static_cast<float>(static_cast<T>(r[j] * inv)));
    }
  });
}

template <typename T>
void silu_and_mul_kernel(const T* in, T* out, int64_t rows, int64_t dim) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = in + i * 2 * dim;
      const T* u = g + dim;
      T* o = out + i * dim;
      for (int64_t j = 0; j < dim; ++j) {
        const float gv = static_cast<float>(g[j]);
        const T silu = static_cast<T>(gv / (1.f + std::exp(-gv)));
        o[j] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(u[j]));
      }
    }
  });
}

template <typename F>
void dispatch(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, name, " supports float32, bfloat16 and float16");
  }
}

// residual += x; x = rms_norm(residual) * weight, in place. Without a residual: x = rms_norm(x) * weight.
void add_rms_norm(at::Tensor& x, std::optional<at::Tensor> residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2, "x must be a contiguous [rows, dim] tensor");
  const int64_t rows = x.size(0), dim = x.size(1);
  dispatch(x, "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const bool add = residual.has_value();
    T* res = add ? residual->data_ptr<T>() : x.data_ptr<T>();
    if (add) TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(), "residual must match x");
    add_rms_norm_kernel<T>(x.data_ptr<T>(), res, weight.data_ptr<T>(), rows, dim, static_cast<float>(eps), add);
  });
}

// [rows, 2 * dim] (gate | up) -> silu(gate) * up, [rows, dim]
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  auto in = gate_up.contiguous();
  const int64_t rows = in.size(0), dim = in.size(1) / 2;
  auto out = at::empty({rows, dim}, in.options());
  dispatch(in, "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_kernel<T>(in.data_ptr<T>(), out.data_ptr<T>(), rows, dim);
  });
  return out;
}

}  // namespace

void register_fused_ops(pybind11::module& m) {
  m.def("add_rms_norm", &add_rms_norm, "in-place residual add + RMSNorm");
  m.def("silu_and_mul", &silu_and_mul, "SwiGLU activation");
}
