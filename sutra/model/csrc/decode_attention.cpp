// Paged decode attention for CPU: one query token per sequence, reading each cached K/V value once,
// straight from its block (no gather copy, no padding). Parallel over sequences. K blocks are stored
// transposed ([kv_head][dim][token]) so scoring a block is a few vector FMAs per dimension.
// fp32 FMAs on widened bf16, not vdpbf16ps: with these layouts the pairs it multiplies are 16 or
// head_dim elements apart, and on Zen 4 both ways of feeding it were slower than this (measured at
// batch 128 x 513 tokens: shuffling pairs together 1.15x the time, half-zero pair operands 1.1x).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

#if defined(__AVX512F__)
using simd::exp512;
using simd::load16;
#endif

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, simd::load16(src + i));
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


// In place: x = softmax(x) over n values.
inline void softmax(float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) m = std::max(m, x[t]);
  int64_t t = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + t), mv));
    _mm512_storeu_ps(x + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; t < n; ++t) {
    x[t] = std::exp(x[t] - m);
    sum += x[t];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// Blocks of one sequence lie anywhere in the cache, which defeats the hardware prefetcher at every
// block boundary; ask for the next block while this one is being used. Into L2, not L1: prefetches
// into L1 hold its few miss buffers and stall the loads being computed on (measured 25% slower).
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 2);
}

// The fast path spreads those prefetches over the loops that compute on the current block, a few
// lines per iteration: a whole block asked for at once fills the core's miss buffers, and the
// block's compute then waited for its own fetch instead of overlapping with the next one (spread:
// 1.4x faster at 128 sequences x 513 tokens, the same results bit for bit).
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t per_tick = 0;

  // bytes at p, over `ticks` calls of tick(); none if p is null.
  void start(const void* p, int64_t bytes, int64_t ticks) {
    next = static_cast<const char*>(p);
    end = p ? next + bytes : next;
    per_tick = std::max<int64_t>(1, (bytes / 64 + ticks - 1) / std::max<int64_t>(ticks, 1));
  }
  inline void tick() {
    for (int64_t i = 0; i < per_tick && next < end; ++i, next += 64) __builtin_prefetch(next, 0, 2);
  }
  void finish() {
    for (; next < end; next += 64) __builtin_prefetch(next, 0, 2);
  }
};

#if defined(__AVX512F__)
// Scores of the 16 tokens of one block against the G query heads that share one KV head. kb is that
// KV head's K tile [head_dim][16]: token-contiguous, so each head dimension is one vector FMA per
// head over all the block's tokens, no horizontal sums; G is a template so the sums stay in registers.
template <int G, typename T>
inline void block_scores16(const T* kb, const float* qf, int64_t head_dim, float* out, Prefetcher& pf) {
  __m512 acc[2][G];  // even and odd dimensions: two chains of dependent FMAs, each half as long
  for (int g = 0; g < G; ++g) acc[0][g] = acc[1][g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < head_dim; d += 2) {
    pf.tick();
    const __m512 k0 = load16(kb + d * 16), k1 = load16(kb + (d + 1) * 16);
    for (int g = 0; g < G; ++g) {
      acc[0][g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g * head_dim + d]), k0, acc[0][g]);
      acc[1][g] = _mm512_fmadd_ps(_mm512_set1_ps(qf[g * head_dim + d + 1]), k1, acc[1][g]);
    }
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(out + g * 16, _mm512_add_ps(acc[0][g], acc[1][g]));
}

// acc[g] += sum over the block's n tokens of p[g][t] * V[t] for one KV head, head_dim = 16 * V16.
// rows points at token 0's V for this KV head; consecutive tokens are row_stride elements apart.
template <int G, int V16, typename T>
inline void block_values(const T* rows, int64_t row_stride, int64_t n, const float* const* p, float* acc,
                         Prefetcher& pf) {
  __m512 a[G][V16];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < V16; ++j) a[g][j] = _mm512_loadu_ps(acc + (g * V16 + j) * 16);
  for (int64_t t = 0; t < n; ++t) {
    pf.tick();
    __m512 v[V16];
    for (int j = 0; j < V16; ++j) v[j] = load16(rows + t * row_stride + j * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g][t]);
      for (int j = 0; j < V16; ++j) a[g][j] = _mm512_fmadd_ps(w, v[j], a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < V16; ++j) _mm512_storeu_ps(acc + (g * V16 + j) * 16, a[g][j]);
}

template <typename T>
using ScoresFn = void (*)(const T*, const float*, int64_t, float*, Prefetcher&);
template <typename T>
using ValuesFn = void (*)(const T*, int64_t, int64_t, const float* const*, float*, Prefetcher&);

template <typename T>
ScoresFn<T> scores_fn(int64_t group) {
  switch (group) {
    case 1: return block_scores16<1, T>;
    case 2: return block_scores16<2, T>;
    case 3: return block_scores16<3, T>;
    case 4: return block_scores16<4, T>;
    case 5: return block_scores16<5, T>;
    case 6: return block_scores16<6, T>;
    case 7: return block_scores16<7, T>;
    case 8: return block_scores16<8, T>;
    default: return nullptr;
  }
}

template <int V16, typename T>
ValuesFn<T> values_fn_for(int64_t group) {
  switch (group) {
    case 1: return block_values<1, V16, T>;
    case 2: return block_values<2, V16, T>;
    case 3: return block_values<3, V16, T>;
    case 4: return block_values<4, V16, T>;
    case 5: return block_values<5, V16, T>;
    case 6: return block_values<6, V16, T>;
    case 7: return block_values<7, V16, T>;
    case 8: return block_values<8, V16, T>;
    default: return nullptr;
  }
}

template <typename T>
ValuesFn<T> values_fn(int64_t group, int64_t head_dim) {
  if (head_dim == 64) return values_fn_for<4, T>(group);
  if (head_dim == 128) return values_fn_for<8, T>(group);
  return nullptr;
}
#endif

// Generic scores: any block size and group.
template <typename T>
inline void block_scores(const T* kb, const float* qf, int64_t group, int64_t head_dim, int64_t block_size,
                         float* out /* [group][block_size] */, float* tmp) {
  std::fill(out, out + group * block_size, 0.f);
  for (int64_t d = 0; d < head_dim; ++d) {
    to_float(kb + d * block_size, tmp, block_size);
    for (int64_t g = 0; g < group; ++g) {
      const float qv = qf[g * head_dim + d];
      float* og = out + g * block_size;
      for (int64_t i = 0; i < block_size; ++i) og[i] += qv * tmp[i];
    }
  }
}

// k_cache: [blocks, kv_heads, head_dim, block_size]; v_cache: [blocks, block_size, kv_heads, head_dim].
template <typename T>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, at::Tensor& out,
                             double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(3);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_table.size(1);
  const T* qp = q.data_ptr<T>();
  const int64_t q_stride = q.stride(0);
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

#if defined(__AVX512F__)
  const ScoresFn<T> fast_scores = block_size == 16 ? scores_fn<T>(group) : nullptr;
  const ValuesFn<T> fast_values = values_fn<T>(group, head_dim);
#else
  const void* fast_scores = nullptr;
  const void* fast_values = nullptr;
#endif
  const int64_t row_len = num_kv_heads * head_dim;  // one token's V for all KV heads, contiguous

  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * head_dim), acc(num_heads * head_dim), row(row_len), scores;
    std::vector<float> tile(group * block_size), tmp(block_size);
    std::vector<const float*> probs(group);
    Prefetcher pf;
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t len = lens[seq];
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      const int64_t* blocks = table + seq * max_blocks;
      scores.resize(num_heads * len);
      to_float(qp + seq * q_stride, qf.data(), num_heads * head_dim);
      for (auto& x : qf) x *= fscale;
      // Block by block, all KV heads of a block at once: the block's K is one contiguous run.
      const int64_t tile_len = head_dim * block_size, k_block_len = num_kv_heads * tile_len;
      const int64_t v_block_len = block_size * row_len;
      // The blocks this thread reads, in order: this sequence's K blocks, its V blocks, then the next
      // sequence's K blocks. Prefetches run one block ahead in that stream (two or three: no faster).
      auto stream_block = [&](int64_t i) -> const T* {
        if (i < num_blocks) return kp + blocks[i] * k_block_len;
        if (i < 2 * num_blocks) return vp + blocks[i - num_blocks] * v_block_len;
        i -= 2 * num_blocks;
        if (seq + 1 >= end || i >= (lens[seq + 1] + block_size - 1) / block_size) return nullptr;
        return kp + table[(seq + 1) * max_blocks + i] * k_block_len;
      };
      for (int64_t b = 0; b < num_blocks; ++b) {
        const T* next = stream_block(b + 1);
        if (fast_scores) pf.start(next, k_block_len * sizeof(T), num_kv_heads * head_dim / 2);
        else if (next) prefetch(next, k_block_len);
        const int64_t n = std::min(block_size, len - b * block_size);
        for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
          const float* qg = qf.data() + kvh * group * head_dim;
          const T* kb = kp + blocks[b] * k_block_len + kvh * tile_len;
#if defined(__AVX512F__)
          if (fast_scores) fast_scores(kb, qg, head_dim, tile.data(), pf);
          else
#endif
            block_scores(kb, qg, group, head_dim, block_size, tile.data(), tmp.data());
          for (int64_t g = 0; g < group; ++g)
            std::copy(tile.data() + g * block_size, tile.data() + g * block_size + n,
                      scores.data() + (kvh * group + g) * len + b * block_size);
        }
        if (fast_scores) pf.finish();
      }
      for (int64_t h = 0; h < num_heads; ++h) softmax(scores.data() + h * len, len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const T* next = stream_block(num_blocks + b + 1);
        const int64_t n = std::min(block_size, len - b * block_size);
        const T* block_rows = vp + blocks[b] * v_block_len;
#if defined(__AVX512F__)
        if (fast_values) {
          pf.start(next, v_block_len * sizeof(T), num_kv_heads * n);
          for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
            for (int64_t g = 0; g < group; ++g) probs[g] = scores.data() + (kvh * group + g) * len + b * block_size;
            fast_values(block_rows + kvh * head_dim, row_len, n, probs.data(), acc.data() + kvh * group * head_dim, pf);
          }
          pf.finish();
          continue;
        }
#endif
        if (next) prefetch(next, v_block_len);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = b * block_size + i;
          to_float(block_rows + i * row_len, row.data(), row_len);
          for (int64_t h = 0; h < num_heads; ++h)
            axpy(scores[h * len + t], row.data() + (h / group) * head_dim, acc.data() + h * head_dim, head_dim);
        }
      }
      T* dst = op + seq * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) dst[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "q must be [seqs, heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the KV cache must have one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(2) == q.size(2), "K cache must be [blocks, kv_heads, head_dim, block_size]");
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
void register_invariant_linear(pybind11::module& m);
void register_prefill_attention(pybind11::module& m);
void register_small_batch_linear(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)");
  register_fused_ops(m);
  register_invariant_linear(m);
  register_prefill_attention(m);
  register_small_batch_linear(m);
}
