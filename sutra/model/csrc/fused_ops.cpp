// Fused elementwise ops for CPU. In eager PyTorch each is 5-10 separate ops (and as many passes over
// memory and dispatches); for a small model's decode step that overhead is most of the non-GEMM time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

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

#if defined(__AVX512BF16__)
using simd::exp512;
using simd::load16;
using simd::round_to_bf16;
using simd::store16;

// 16 outputs of bf16 SwiGLU, rounding where unfused torch rounds (after silu, after the product).
inline void silu_and_mul16(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* o) {
  const __m512 gv = load16(g);
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 silu = round_to_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv)))));
  store16(o, _mm512_mul_ps(silu, load16(u)));
}
#endif

template <typename T>
void silu_and_mul_kernel(const T* in, T* out, int64_t rows, int64_t dim) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = in + i * 2 * dim;
      const T* u = g + dim;
      T* o = out + i * dim;
      int64_t j = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>)
        for (; j + 16 <= dim; j += 16) silu_and_mul16(g + j, u + j, o + j);
#endif
      for (; j < dim; ++j) {
        const float gv = static_cast<float>(g[j]);
        const T silu = static_cast<T>(gv / (1.f + std::exp(-gv)));
        o[j] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(u[j]));
      }
    }
  });
}

// qkv: [T, (H + 2 * KVH) * D], rows may be strided. Rotates q and k in place (HF rotate-half layout)
// with the cos/sin tables [max_pos, D / 2] at each token's position, and stores k and v at the
// token's slot: K cache [blocks, KVH, D, block_size] (transposed), V cache [blocks, block_size, KVH, D].
template <typename T>
void rotary_cache_kernel(T* qkv, int64_t row_stride, const T* cos, const T* sin, const int64_t* positions,
                         const int64_t* slots, T* k_cache, T* v_cache, int64_t tokens, int64_t heads,
                         int64_t kv_heads, int64_t dim, int64_t block_size) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv + t * row_stride;
      const T* c = cos + positions[t] * half;
      const T* s = sin + positions[t] * half;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        T* x = row + h * dim;
        int64_t i = 0;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, at::BFloat16>)
          for (; i + 16 <= half; i += 16) {
            const __m512 x1 = load16(x + i), x2 = load16(x + i + half);
            const __m512 ci = load16(c + i), si = load16(s + i);
            const __m512 r1 = _mm512_fmsub_ps(x1, ci, _mm512_mul_ps(x2, si));
            const __m512 r2 = _mm512_fmadd_ps(x2, ci, _mm512_mul_ps(x1, si));
            store16(x + i, r1);
            store16(x + i + half, r2);
          }
#endif
        for (; i < half; ++i) {
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          const float ci = static_cast<float>(c[i]), si = static_cast<float>(s[i]);
          x[i] = static_cast<T>(x1 * ci - x2 * si);
          x[i + half] = static_cast<T>(x2 * ci + x1 * si);
        }
      }
      const int64_t kv_len = kv_heads * dim;
      const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
      const T* k = row + heads * dim;
      T* kb = k_cache + block * kv_len * block_size + offset;
      for (int64_t i = 0; i < kv_len; ++i) kb[i * block_size] = k[i];
      std::memcpy(v_cache + slots[t] * kv_len, row + (heads + kv_heads) * dim, kv_len * sizeof(T));
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

void rotary_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [tokens, width] with contiguous rows");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "caches and rotary tables must be contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "positions and slots are int64");
  const int64_t kv_heads = v_cache.size(2), dim = v_cache.size(3), block_size = v_cache.size(1);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * kv_heads) * dim, "qkv width does not match the heads");
  auto pos = positions.contiguous();
  auto slot = slots.contiguous();
  dispatch(qkv, "rotary_and_cache", [&](auto tag) {
    using T = decltype(tag);
    rotary_cache_kernel<T>(qkv.data_ptr<T>(), qkv.stride(0), cos.data_ptr<T>(), sin.data_ptr<T>(),
                           pos.data_ptr<int64_t>(), slot.data_ptr<int64_t>(), k_cache.data_ptr<T>(),
                           v_cache.data_ptr<T>(), qkv.size(0), num_heads, kv_heads, dim, block_size);
  });
}

}  // namespace

void register_fused_ops(pybind11::module& m) {
  m.def("add_rms_norm", &add_rms_norm, "in-place residual add + RMSNorm");
  m.def("silu_and_mul", &silu_and_mul, "SwiGLU activation");
  m.def("rotary_and_cache", &rotary_and_cache, "in-place RoPE on q and k, then K/V into the paged cache");
}
