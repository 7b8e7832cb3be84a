// bf16 linear layers for up to 8 rows at a time (decode of one or a few sequences), on CPUs with
// AVX512-BF16. Such a product reads every weight once and does almost no arithmetic per byte, so it
// runs at the speed weights stream from memory; oneDNN's prepacked GEMV reaches ~60% of it.
//
// The weight W [N, K] is repacked once into tiles of 16 output features, [N/16][K/2][16 x 2]: one
// 512-bit load holds two consecutive inputs of 16 outputs, exactly what vdpbf16ps multiplies with a
// broadcast pair of x, so 16 outputs accumulate in one register with no horizontal sums. Every
// thread streams a contiguous run of tiles, which the hardware prefetcher follows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "simd.h"

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kChains = 4;  // the most independent sums per output tile (to hide the instruction's latency)

// Whether this build runs a [out_features, in_features] weight: AVX512-BF16, whole 16-output tiles,
// inputs in whole steps of the kChains pairs summed side by side.
bool small_batch_linear_supports(int64_t out_features, int64_t in_features) {
#if defined(__AVX512BF16__)
  return out_features % 16 == 0 && in_features % (2 * kChains) == 0;
#else
  return false;
#endif
}

at::Tensor pack_small_batch_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "weight must be a bf16 [N, K] matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(small_batch_linear_supports(n, k), "small_batch_linear does not cover a [", n, ", ", k, "] weight");
  auto w = weight.contiguous();
  // [N/16, 16, K/2, 2] -> [N/16, K/2, 16, 2]
  return w.view({n / 16, 16, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

#if defined(__AVX512BF16__)
// y[m][this tile's 16 outputs] for M rows of x, with C independent sums per row.
template <int M, int C>
inline void tile_product(const at::BFloat16* x, int64_t k, const at::BFloat16* w, __m512 bias, at::BFloat16* y,
                         int64_t n) {
  const int64_t pairs = k / 2;
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p += C) {
    for (int c = 0; c < C; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (p + c) * 32);
      for (int m = 0; m < M; ++m) {
        int32_t bits;
        std::memcpy(&bits, x + m * k + 2 * (p + c), sizeof(bits));
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv, (__m512bh)_mm512_set1_epi32(bits));
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = bias;
    for (int c = 0; c < C; ++c) sum = _mm512_add_ps(sum, acc[m][c]);
    simd::store16(y + m * n, sum);
  }
}

// Up to 4 rows, kChains sums per row cover the instruction's latency; 5 to 8 rows have enough in
// flight with 2. (Decode steps of 5 to 8 sequences run ~1.2x faster on this than on oneDNN's GEMM.)
void tiles_kernel(const at::BFloat16* x, int64_t m, int64_t k, const at::BFloat16* packed, const at::BFloat16* bias,
                  at::BFloat16* y, int64_t n, int64_t tile_begin, int64_t tile_end) {
  const int64_t pairs = k / 2;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const at::BFloat16* w = packed + tile * pairs * 32;
    const __m512 b = bias != nullptr ? simd::load16(bias + tile * 16) : _mm512_setzero_ps();
    at::BFloat16* yt = y + tile * 16;
    switch (m) {
      case 1: tile_product<1, kChains>(x, k, w, b, yt, n); break;
      case 2: tile_product<2, kChains>(x, k, w, b, yt, n); break;
      case 3: tile_product<3, kChains>(x, k, w, b, yt, n); break;
      case 4: tile_product<4, kChains>(x, k, w, b, yt, n); break;
      case 5: tile_product<5, 2>(x, k, w, b, yt, n); break;
      case 6: tile_product<6, 2>(x, k, w, b, yt, n); break;
      case 7: tile_product<7, 2>(x, k, w, b, yt, n); break;
      default: tile_product<8, 2>(x, k, w, b, yt, n); break;
    }
  }
}
#endif

// x [M, K] bf16 with M <= kMaxRows; packed from pack_small_batch_weight; returns [M, N].
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
#if !defined(__AVX512BF16__)
  TORCH_CHECK(false, "small_batch_linear needs a CPU with AVX512-BF16");
  return x;
#else
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be a bf16 [M, K] matrix");
  const int64_t m = x.size(0), k = x.size(1), tiles = packed.size(0), n = tiles * 16;
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "small_batch_linear takes 1 to ", kMaxRows, " rows");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == k, "x does not match the packed weight");
  auto xc = x.contiguous();
  auto out = at::empty({m, n}, x.options());
  const at::BFloat16* bp = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.numel() == n && bias_c.scalar_type() == at::kBFloat16, "bias must be bf16 [N]");
    bp = bias_c.data_ptr<at::BFloat16>();
  }
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = packed.data_ptr<at::BFloat16>();
  at::BFloat16* yp = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) { tiles_kernel(xp, m, k, wp, bp, yp, n, begin, end); });
  return out;
#endif
}

}  // namespace

void register_small_batch_linear(pybind11::module& m) {
  m.def("small_batch_linear_supports", &small_batch_linear_supports, "whether a [N, K] weight is covered");
  m.def("pack_small_batch_weight", &pack_small_batch_weight, "repack a bf16 [N, K] weight into 16-output tiles");
  m.def("small_batch_linear", &small_batch_linear, "x @ W.T (+ bias) for 1 to 8 bf16 rows");
}
