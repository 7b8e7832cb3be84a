// Paged decode attention for CPU: one query token per sequence, reading each cached K/V row once,
// straight from its block (no gather copy, no padding). Parallel over sequences; every query head
// is scored against a token's K row (all KV heads, contiguous) while it is in cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(wide));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_float(const at::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 a = _mm512_set1_ps(alpha);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, at::Tensor& out,
                             double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_table.size(1);
  const int64_t row_len = num_kv_heads * head_dim;  // one token's K (or V) for all KV heads
  const T* qp = q.data_ptr<T>();
  const int64_t q_stride = q.stride(0);
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * head_dim), acc(num_heads * head_dim), row(row_len), scores;
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t len = lens[seq];
      const int64_t* blocks = table + seq * max_blocks;
      scores.resize(num_heads * len);
      to_float(qp + seq * q_stride, qf.data(), num_heads * head_dim);
      for (auto& x : qf) x *= fscale;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t off = (blocks[t / block_size] * block_size + t % block_size) * row_len;
        to_float(kp + off, row.data(), row_len);
        for (int64_t h = 0; h < num_heads; ++h)
          scores[h * len + t] = dot(qf.data() + h * head_dim, row.data() + (h / group) * head_dim, head_dim);
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* sh = scores.data() + h * len;
        const float m = *std::max_element(sh, sh + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = std::exp(sh[t] - m);
          sum += sh[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sh[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t off = (blocks[t / block_size] * block_size + t % block_size) * row_len;
        to_float(vp + off, row.data(), row_len);
        for (int64_t h = 0; h < num_heads; ++h)
          axpy(scores[h * len + t], row.data() + (h / group) * head_dim, acc.data() + h * head_dim, head_dim);
      }
      T* dst = op + seq * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) dst[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [seqs, heads, dim], caches [blocks, size, kv_heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the KV cache must have one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  // Rows may be strided (q is a view into the fused qkv projection); within a row heads are dense.
  auto qc = (q.stride(2) == 1 && q.stride(1) == q.size(2)) ? q : q.contiguous();
  auto table = block_table.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  switch (q.scalar_type()) {
    case at::kBFloat16: decode_attention_kernel<at::BFloat16>(qc, k_cache, v_cache, table, lens, out, scale); break;
    case at::kHalf: decode_attention_kernel<at::Half>(qc, k_cache, v_cache, table, lens, out, scale); break;
    case at::kFloat: decode_attention_kernel<float>(qc, k_cache, v_cache, table, lens, out, scale); break;
    default: TORCH_CHECK(false, "decode_attention supports float32, bfloat16 and float16");
  }
  return out;
}

}  // namespace

void register_fused_ops(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)");
  register_fused_ops(m);
}
