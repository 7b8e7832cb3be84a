// Weight-only int8 linear layers: y = (x q^T) * scale (+ bias), q int8 [N, K] with one fp32 scale per
// output channel. A decode step reads every weight once and does almost no arithmetic per byte, so int8
// weights (4x fewer bytes than fp32) are what makes it faster; the widening to fp32 happens in registers
// and the scale is applied once per output, after its sum.
//
// The weight is packed once into tiles of 16 outputs, [tiles][K][16] int8 (as invariant_linear.cpp packs
// fp32): a tile's row k holds input k's weights of its 16 outputs, widened to fp32 vectors and multiplied
// by a broadcast x[row][k], so sums need no horizontal reduction. Vectors are GCC vector types at the
// machine's width (AVX512, AVX2 or SSE from one source). Each output is one fp32 sum in the order
// k = 0, 1, ..., K-1 whatever the number of rows, so a row's result does not depend on its batch mates.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;
#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr int kRowBlock = 8;  // rows x 1 tile: 8 of 32 registers hold sums
#elif defined(__AVX2__)
constexpr int kWidth = 8;
constexpr int kRowBlock = 6;  // 12 of 16 registers hold sums
#else
constexpr int kWidth = 4;
constexpr int kRowBlock = 2;
#endif
constexpr int kVecs = kLanes / kWidth;  // vectors per tile row
// Many rows of a weight too large to stay in cache: widen each tile once into an fp32 scratch (see
// linear_kernel). Measured on AVX2 at 16-256 rows: 1.2-1.6x faster for 16-33M-weight matrices,
// 0.6-0.95x for the 0.3-1.8M-weight ones, which stay in cache between row chunks.
constexpr int64_t kWidenRows = 16;
constexpr int64_t kWidenWeights = int64_t{4} << 20;
typedef float vfloat __attribute__((vector_size(4 * kWidth)));
typedef int8_t vi8 __attribute__((vector_size(kWidth)));
typedef int32_t vi32 __attribute__((vector_size(4 * kWidth)));

// kWidth int8 weights widened exactly to fp32: sign-extend, then convert (GCC's generic conversion of
// a byte vector goes through scalar registers, ~10x slower).
inline vfloat load_vec(const int8_t* p) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vi8 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return __builtin_convertvector(__builtin_convertvector(raw, vi32), vfloat);
#endif
}

inline vfloat load_vec(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Sums over R rows of x and T tiles of w (int8, or already widened to fp32), then
// y = sum * scale (+ bias), rounded once to Y.
template <int R, int T, typename W, typename Y>
void block_product(const float* x, int64_t k, const W* w, int64_t tile_stride, const float* scale,
                   const float* bias, Y* y, int64_t n, int64_t col0) {
  vfloat acc[R][T * kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < T * kVecs; ++v) acc[r][v] = vfloat{};
  for (int64_t i = 0; i < k; ++i) {
    vfloat wv[T * kVecs];
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < kVecs; ++v) wv[t * kVecs + v] = load_vec(w + t * tile_stride + i * kLanes + v * kWidth);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * k + i];
      for (int v = 0; v < T * kVecs; ++v) acc[r][v] += wv[v] * xs;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float lanes[kLanes];
      std::memcpy(lanes, &acc[r][t * kVecs], sizeof(lanes));
      const int64_t c0 = col0 + t * kLanes, live = std::min<int64_t>(kLanes, n - c0);
      Y* yr = y + r * n + c0;
      for (int64_t j = 0; j < live; ++j) {
        const float v = lanes[j] * scale[c0 + j];
        yr[j] = static_cast<Y>(bias ? v + bias[c0 + j] : v);
      }
    }
}

// Few rows read each widened weight vector against more tiles at once instead, to keep enough
// independent sums in flight: one row x 4 tiles, 2-3 rows x 2 tiles, else kRowBlock rows x 1 tile.
template <int R, typename W, typename Y>
void rows_tiles(const float* x, int64_t k, const W* w, int64_t tiles, int64_t tile_stride, const float* scale,
                const float* bias, Y* y, int64_t n, int64_t col0) {
  constexpr int T = R == 1 ? 4 : (R <= 3 ? 2 : 1);
  int64_t t = 0;
  for (; t + T <= tiles; t += T)
    block_product<R, T>(x, k, w + t * tile_stride, tile_stride, scale, bias, y, n, col0 + t * kLanes);
  for (; t < tiles; ++t)
    block_product<R, 1>(x, k, w + t * tile_stride, tile_stride, scale, bias, y, n, col0 + t * kLanes);
}

template <typename W, typename Y>
void rows_product(const float* x, int64_t m, int64_t k, const W* w, int64_t tiles, int64_t tile_stride,
                  const float* scale, const float* bias, Y* y, int64_t n, int64_t col0) {
  int64_t r = 0;
  for (; r + kRowBlock <= m; r += kRowBlock)
    rows_tiles<kRowBlock>(x + r * k, k, w, tiles, tile_stride, scale, bias, y + r * n, n, col0);
  const float* xr = x + r * k;
  Y* yr = y + r * n;
  switch (m - r) {
    case 0: break;
    case 1: rows_tiles<1>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    case 2: rows_tiles<2>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    case 3: rows_tiles<3>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    case 4: rows_tiles<4>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    case 5: rows_tiles<5>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    case 6: rows_tiles<6>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    case 7: rows_tiles<7>(xr, k, w, tiles, tile_stride, scale, bias, yr, n, col0); break;
    default: TORCH_CHECK(false, "unreachable row remainder");
  }
}

// Threads split the output tiles in runs of kTileGroup (each thread streams its own contiguous part of
// the weight); each walks the rows a chunk at a time so the chunk stays in cache while its tiles stream.
// Many rows (prefill) of a large weight widen each tile once per chunk into an fp32 scratch tile (a
// sequential pass over the int8 tile, then multiply-adds from cache) instead of once per kRowBlock
// rows. The sums are the same multiply-adds in the same order either way: both paths give the same bits.
template <typename Y>
void linear_kernel(const float* x, int64_t m, int64_t k, const int8_t* w, int64_t tiles, const float* scale,
                   const float* bias, Y* y, int64_t n) {
  const int64_t tile_stride = k * kLanes;
  constexpr int64_t kTileGroup = 4;
  constexpr int64_t kRowChunk = 8 * kRowBlock;
  const int64_t groups = (tiles + kTileGroup - 1) / kTileGroup;
  const bool widen = m >= kWidenRows && n * k >= kWidenWeights;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile0 = begin * kTileGroup, tile1 = std::min(tiles, end * kTileGroup);
    std::vector<float> scratch(widen ? tile_stride : 0);
    for (int64_t row0 = 0; row0 < m; row0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, m - row0);
      if (!widen) {
        rows_product(x + row0 * k, rows, k, w + tile0 * tile_stride, tile1 - tile0, tile_stride, scale, bias,
                     y + row0 * n, n, tile0 * kLanes);
        continue;
      }
      for (int64_t tile = tile0; tile < tile1; ++tile) {
        const int8_t* src = w + tile * tile_stride;
        for (int64_t i = 0; i < tile_stride; i += kWidth) {
          const vfloat v = load_vec(src + i);
          std::memcpy(scratch.data() + i, &v, sizeof(v));
        }
        rows_product(x + row0 * k, rows, k, scratch.data(), 1, tile_stride, scale, bias, y + row0 * n, n,
                     tile * kLanes);
      }
    }
  });
}

// x: [M, K] fp32, bf16 or fp16; packed: [tiles, K, 16] int8; scale: fp32 [N]; bias: [N] (any float type).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be an [M, K] matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kLanes && packed.is_contiguous() &&
                  packed.scalar_type() == at::kChar,
              "packed weight must be a contiguous int8 [tiles, K, 16] tensor");
  const int64_t m = x.size(0), k = x.size(1), tiles = packed.size(0), n = scale.numel();
  TORCH_CHECK(packed.size(1) == k, "x has ", k, " inputs but the weight ", packed.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be contiguous fp32");
  TORCH_CHECK(n <= tiles * kLanes && n > (tiles - 1) * kLanes, "the scales do not match the tiles");
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({m, n}, x.options());
  const float* bp = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == n, "bias must have ", n, " values");
    bp = bias_f.data_ptr<float>();
  }
  if (m == 0) return out;
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: linear_kernel(xp, m, k, wp, tiles, sp, bp, out.data_ptr<float>(), n); break;
    case at::kBFloat16: linear_kernel(xp, m, k, wp, tiles, sp, bp, out.data_ptr<at::BFloat16>(), n); break;
    case at::kHalf: linear_kernel(xp, m, k, wp, tiles, sp, bp, out.data_ptr<at::Half>(), n); break;
    default: TORCH_CHECK(false, "int8_linear supports float32, bfloat16 and float16 inputs");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "(x @ q.T) * scale (+ bias) for int8 weights packed in 16-output tiles");
}
