// Paged prefill attention for CPUs with AVX512-BF16: the queries of one prefill chunk against its
// whole context (cached tokens + the chunk itself, all already in the paged cache), causal with the
// chunk at the end of the context. bf16 products are summed in fp32 by vdpbf16ps, 32 multiply-adds
// an instruction, where torch's CPU SDPA reaches about a fifth of the machine's bf16 peak.
//
// Each KV head's context is first repacked so one 512-bit load feeds a dot-product instruction:
//   K: [tile of 16 keys][head_dim / 2][16 keys x 2 dims]   (lanes = keys, pairs along head_dim)
//   V: [pair of keys][head_dim / 16][16 dims x 2 keys]     (lanes = dims, pairs along keys)
// Then each task takes a few query rows times the query heads sharing that KV head (up to 12
// row-heads, one accumulator register each), computes their scores over the keys they may see,
// takes an exact softmax in fp32, rounds the probabilities to bf16 (as flash attention kernels do)
// and multiplies them into V.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

constexpr int kMaxRowHeads = 12;

#if defined(__AVX512BF16__)

using bf16 = at::BFloat16;
using simd::exp512;

inline __m512i load_pair_broadcast(const bf16* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm512_set1_epi32(bits);
}

// Interleave 16 bf16 of a with 16 of b: a0 b0 a1 b1 ... a15 b15.
inline __m512i interleave16(const bf16* a, const bf16* b) {
  static const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i both = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
  return _mm512_permutexvar_epi16(idx, both);
}

// scores[r][16 keys of the tile] = q[r] . k for RH row-heads; q rows are bf16, head_dim values each.
template <int RH>
inline void tile_scores(const bf16* k_tile, const bf16* const* q, int64_t head_dim, float* scores, int64_t stride) {
  __m512 acc[RH];
  for (int r = 0; r < RH; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < head_dim / 2; ++p) {
    const __m512bh k = (__m512bh)_mm512_loadu_si512(k_tile + p * 32);
    for (int r = 0; r < RH; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], k, (__m512bh)load_pair_broadcast(q[r] + 2 * p));
  }
  for (int r = 0; r < RH; ++r) _mm512_storeu_ps(scores + r * stride, acc[r]);
}

// out[r][16 dims] = sum over key pairs of p[r][pair] . v[pair][16 dims], for one 16-dim slice.
template <int RH>
inline void slice_values(const bf16* v_slice, int64_t pair_stride, int64_t num_pairs, const bf16* probs,
                         int64_t prob_stride, float* out, int64_t out_stride) {
  __m512 acc[RH];
  for (int r = 0; r < RH; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t t = 0; t < num_pairs; ++t) {
    const __m512bh v = (__m512bh)_mm512_loadu_si512(v_slice + t * pair_stride);
    for (int r = 0; r < RH; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], v, (__m512bh)load_pair_broadcast(probs + r * prob_stride + 2 * t));
  }
  for (int r = 0; r < RH; ++r) _mm512_storeu_ps(out + r * out_stride, acc[r]);
}

using ScoresFn = void (*)(const bf16*, const bf16* const*, int64_t, float*, int64_t);
using ValuesFn = void (*)(const bf16*, int64_t, int64_t, const bf16*, int64_t, float*, int64_t);

template <int... RH>
constexpr std::array<ScoresFn, sizeof...(RH)> scores_table(std::integer_sequence<int, RH...>) {
  return {tile_scores<RH + 1>...};
}
template <int... RH>
constexpr std::array<ValuesFn, sizeof...(RH)> values_table(std::integer_sequence<int, RH...>) {
  return {slice_values<RH + 1>...};
}

// probs[0, n) = bf16(exp(scale * (s - max))) over the first `visible` scores, zero after; returns
// the sum of the rounded probabilities, so normalizing afterwards matches what was multiplied in.
inline float softmax_numerators(const float* s, int64_t visible, int64_t n, float scale, bf16* probs) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < visible; ++t) m = std::max(m, s[t]);
  const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(scale);
  __m512 acc = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t < n; t += 16) {
    const __mmask16 live = t + 16 <= visible ? 0xFFFF : (t < visible ? (__mmask16)((1u << (visible - t)) - 1) : 0);
    const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv), sv)));
    const __m256bh rounded = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + t), (__m256i)rounded);
    // Sum what was rounded: widen bf16 back to fp32.
    acc = _mm512_add_ps(acc, simd::widen_bf16((__m256i)rounded));
  }
  return _mm512_reduce_add_ps(acc);
}

#endif  // __AVX512BF16__

// Whether this build runs these shapes: AVX512-BF16, up to kMaxRowHeads query heads per KV head,
// whole pairs and 16-dim slices of head_dim, 16-key tiles that never straddle a block.
bool supports(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size) {
#if defined(__AVX512BF16__)
  return num_kv_heads > 0 && num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= kMaxRowHeads &&
         head_dim % 32 == 0 && block_size % 16 == 0;
#else
  return false;
#endif
}

// q: [n, H, D] bf16, rows may be strided; k_cache [blocks, KVH, D, bs]; v_cache [blocks, bs, KVH, D];
// block_ids: the blocks holding context tokens [0, context_len); the n queries are its last n tokens.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_ids, int64_t context_len, double scale) {
#if !defined(__AVX512BF16__)
  TORCH_CHECK(false, "prefill_attention needs a CPU with AVX512-BF16");
  return q;
#else
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [n, heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  const int64_t n = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(3);
  TORCH_CHECK(supports(num_heads, num_kv_heads, head_dim, block_size), "prefill_attention does not cover heads ",
              num_heads, "/", num_kv_heads, ", head_dim ", head_dim, ", block size ", block_size);
  const int64_t group = num_heads / num_kv_heads;
  TORCH_CHECK(n >= 1 && n <= context_len, "the chunk must lie inside its context");
  auto blocks_t = block_ids.to(at::kLong).contiguous();
  TORCH_CHECK(blocks_t.numel() * block_size >= context_len, "too few blocks for the context");
  const int64_t* blocks = blocks_t.data_ptr<int64_t>();

  const int64_t tiles = (context_len + 15) / 16, padded = tiles * 16, pairs = padded / 2;
  const int64_t dim_pairs = head_dim / 2, slices = head_dim / 16;
  const bf16* kc = k_cache.data_ptr<bf16>();
  const bf16* vc = v_cache.data_ptr<bf16>();
  const int64_t k_block = num_kv_heads * head_dim * block_size, v_row = num_kv_heads * head_dim;

  // Repack K and V of every KV head; padding keys are zero (and masked out below).
  std::vector<bf16> kp(num_kv_heads * tiles * head_dim * 16), vp(num_kv_heads * pairs * head_dim * 2);
  const std::vector<bf16> zeros(std::max<int64_t>(head_dim, 16), bf16(0.f));
  at::parallel_for(0, num_kv_heads * tiles, 4, [&](int64_t begin, int64_t end) {
    std::vector<bf16> k_rows(head_dim * 16);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / tiles, tile = task % tiles;
      const int64_t first = tile * 16, live = std::min<int64_t>(16, context_len - first);
      // K rows of this tile's 16 keys, [dim][16]: a 16-key run of one cache block.
      const int64_t block = blocks[first / block_size], offset = first % block_size;
      const bf16* src = kc + block * k_block + h * head_dim * block_size + offset;
      for (int64_t d = 0; d < head_dim; ++d) {
        bf16* row = k_rows.data() + d * 16;
        std::memcpy(row, src + d * block_size, live * sizeof(bf16));
        std::fill(row + live, row + 16, bf16(0.f));
      }
      bf16* kdst = kp.data() + (h * tiles + tile) * head_dim * 16;
      for (int64_t p = 0; p < dim_pairs; ++p)
        _mm512_storeu_si512(kdst + p * 32, interleave16(k_rows.data() + 2 * p * 16, k_rows.data() + (2 * p + 1) * 16));
      // V: the tile's 8 key pairs.
      for (int64_t j = 0; j < 16; j += 2) {
        const int64_t t0 = first + j, t1 = t0 + 1;
        const bf16* v0 = t0 < context_len
                             ? vc + (blocks[t0 / block_size] * block_size + t0 % block_size) * v_row + h * head_dim
                             : zeros.data();
        const bf16* v1 = t1 < context_len
                             ? vc + (blocks[t1 / block_size] * block_size + t1 % block_size) * v_row + h * head_dim
                             : zeros.data();
        bf16* vdst = vp.data() + ((h * pairs) + t0 / 2) * head_dim * 2;
        for (int64_t s = 0; s < slices; ++s)
          _mm512_storeu_si512(vdst + s * 32, interleave16(v0 + s * 16, v1 + s * 16));
      }
    }
  });

  auto out = at::empty({n, num_heads, head_dim}, q.options());
  const bf16* qp = q.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t q_stride = q.stride(0);
  const int64_t rows_per_task = std::max<int64_t>(1, kMaxRowHeads / group);
  const int64_t row_tasks = (n + rows_per_task - 1) / rows_per_task;
  static constexpr auto score_fns = scores_table(std::make_integer_sequence<int, kMaxRowHeads>{});
  static constexpr auto value_fns = values_table(std::make_integer_sequence<int, kMaxRowHeads>{});
  const float fscale = static_cast<float>(scale);

  // Later rows see more keys: hand out tasks one at a time so both threads finish together.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores(kMaxRowHeads * padded), acc(kMaxRowHeads * 16);
    std::vector<bf16> probs(kMaxRowHeads * padded);
    std::vector<float> sums(kMaxRowHeads);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_kv_heads * row_tasks; ++task) {
      // Longest tasks (last rows) first.
      const int64_t h = task % num_kv_heads, rt = row_tasks - 1 - task / num_kv_heads;
      const int64_t row0 = rt * rows_per_task, rows = std::min(rows_per_task, n - row0);
      const int64_t rh = rows * group;
      const bf16* qrows[kMaxRowHeads];
      int64_t visible[kMaxRowHeads];
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t g = 0; g < group; ++g) {
          qrows[i * group + g] = qp + (row0 + i) * q_stride + (h * group + g) * head_dim;
          visible[i * group + g] = context_len - n + row0 + i + 1;
        }
      const int64_t keys = visible[rh - 1], key_tiles = (keys + 15) / 16, key_pairs = key_tiles * 8;
      const bf16* ktiles = kp.data() + h * tiles * head_dim * 16;
      for (int64_t tile = 0; tile < key_tiles; ++tile)
        score_fns[rh - 1](ktiles + tile * head_dim * 16, qrows, head_dim, scores.data() + tile * 16, padded);
      for (int64_t r = 0; r < rh; ++r)
        sums[r] = softmax_numerators(scores.data() + r * padded, visible[r], key_tiles * 16, fscale,
                                     probs.data() + r * padded);
      const bf16* vpairs = vp.data() + h * pairs * head_dim * 2;
      for (int64_t s = 0; s < slices; ++s) {
        value_fns[rh - 1](vpairs + s * 32, head_dim * 2, key_pairs, probs.data(), padded, acc.data(), 16);
        for (int64_t r = 0; r < rh; ++r) {
          const int64_t i = r / group, g = r % group;
          bf16* dst = op + ((row0 + i) * num_heads + h * group + g) * head_dim + s * 16;
          const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * 16), _mm512_set1_ps(1.f / sums[r]));
          simd::store16(dst, o);
        }
      }
    }
  }
  return out;
#endif
}

}  // namespace

void register_prefill_attention(pybind11::module& m) {
  m.def("prefill_attention_supports", &supports, "whether prefill_attention covers (heads, kv_heads, head_dim, block)");
  m.def("prefill_attention", &prefill_attention, "paged causal prefill attention, bf16 (CPU)");
}
