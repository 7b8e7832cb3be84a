// Batch-invariant linear layers (any dtype, any shape): y = x W^T (+ bias) where every output is one
// fp32 sum taken in a fixed order, k = 0, 1, ..., K-1, one multiply-add at a time, then the bias,
// then one rounding to the output type. The number of rows, a row's place among them and the thread
// that computes it change how outputs are grouped into registers, never the arithmetic of one output,
// so a row's result is bit-identical in any batch (oneDNN's GEMMs pick their blocking, and with it
// the order of each sum, from the whole shape).
//
// The weight is packed once into tiles of 16 outputs, [tiles][K][16] (fp32 or bf16): a tile's row k
// holds input k's weights for its 16 outputs, multiplied by a broadcast x[row][k]. Vectors are GCC
// vector types at the machine's width, so one source compiles to AVX512, AVX2 or SSE with every lane
// elementwise; rows x tiles blocks of independent sums keep the multiply-add units busy (6 rows x 16
// outputs in AVX2, the usual fp32 GEMM block there).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;
// The machine's vector width: wider generic vectors are split by the compiler through memory.
#if defined(__AVX512F__)
constexpr int kWidth = 16;
constexpr int kRowBlock = 8, kTileBlock = 2;  // 16 of 32 registers hold sums
#elif defined(__AVX__)
constexpr int kWidth = 8;
constexpr int kRowBlock = 6, kTileBlock = 1;  // 12 of 16 registers hold sums
#else
constexpr int kWidth = 4;
constexpr int kRowBlock = 2, kTileBlock = 1;  // 8 of 16
#endif
constexpr int kVecs = kLanes / kWidth;  // vectors per tile row
constexpr int kSingleRowTiles = 4;  // one row: more tiles give the independent sums instead
typedef float vfloat __attribute__((vector_size(4 * kWidth)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kWidth)));
typedef uint32_t vu32 __attribute__((vector_size(4 * kWidth)));

inline vfloat load_vec(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A bf16 is the top half of an fp32: widening is exact.
inline vfloat load_vec(const at::BFloat16* p) {
  vu16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  return (vfloat)(__builtin_convertvector(raw, vu32) << 16);
}

// sums[r][t] over R rows of x and T tiles of w, then y = sum + bias rounded to the output type.
template <int R, int T, typename W, typename Y>
void block_product(const float* x, int64_t k, const W* w, int64_t tile_stride, const float* bias, Y* y,
                   int64_t n, int64_t col0) {
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
      for (int64_t j = 0; j < live; ++j) yr[j] = static_cast<Y>(bias ? lanes[j] + bias[c0 + j] : lanes[j]);
    }
}

template <int T, typename W, typename Y>
void rows_product(const float* x, int64_t m, int64_t k, const W* w, int64_t tile_stride, const float* bias, Y* y,
                  int64_t n, int64_t col0) {
  int64_t r = 0;
  for (; r + kRowBlock <= m; r += kRowBlock)
    block_product<kRowBlock, T>(x + r * k, k, w, tile_stride, bias, y + r * n, n, col0);
  const float* xr = x + r * k;
  Y* yr = y + r * n;
  switch (m - r) {
    case 0: break;
    case 1: block_product<1, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
    case 2: block_product<2, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
    case 3: block_product<3, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
    case 4: block_product<4, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
    case 5: block_product<5, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
#if defined(__AVX512F__)
    case 6: block_product<6, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
    case 7: block_product<7, T>(xr, k, w, tile_stride, bias, yr, n, col0); break;
#endif
    default: TORCH_CHECK(false, "unreachable row remainder");
  }
}

// Threads split the output tiles; each walks the rows a chunk at a time so the chunk stays in cache
// while the thread's tiles stream past it.
template <typename W, typename Y>
void linear_kernel(const float* x, int64_t m, int64_t k, const W* w, int64_t tiles, const float* bias, Y* y,
                   int64_t n) {
  const int64_t tile_stride = k * kLanes;
  const int64_t group = m == 1 ? kSingleRowTiles : kTileBlock;
  const int64_t groups = (tiles + group - 1) / group;
  constexpr int64_t kRowChunk = 8 * kRowBlock;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row0 = 0; row0 < m; row0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, m - row0);
      const float* xc = x + row0 * k;
      Y* yc = y + row0 * n;
      for (int64_t g = begin; g < end; ++g) {
        int64_t tile = g * group;
        const int64_t last = std::min(tiles, tile + group);
        if (m == 1 && last - tile == kSingleRowTiles) {
          block_product<1, kSingleRowTiles>(xc, k, w + tile * tile_stride, tile_stride, bias, yc, n, tile * kLanes);
          continue;
        }
        for (; tile + kTileBlock <= last; tile += kTileBlock)
          rows_product<kTileBlock>(xc, rows, k, w + tile * tile_stride, tile_stride, bias, yc, n, tile * kLanes);
        for (; tile < last; ++tile)
          rows_product<1>(xc, rows, k, w + tile * tile_stride, tile_stride, bias, yc, n, tile * kLanes);
      }
    }
  });
}

// x: [M, K] fp32, bf16 or fp16; packed: [tiles, K, 16] fp32 or bf16 (see the Python side); bias: fp32 [N].
at::Tensor invariant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be an [M, K] matrix");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kLanes && packed.is_contiguous(),
              "packed weight must be a contiguous [tiles, K, 16] tensor");
  const int64_t m = x.size(0), k = x.size(1), tiles = packed.size(0);
  TORCH_CHECK(packed.size(1) == k, "x has ", k, " inputs but the weight ", packed.size(1));
  TORCH_CHECK(out_features <= tiles * kLanes && out_features > (tiles - 1) * kLanes, "out_features does not match the tiles");
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({m, out_features}, x.options());
  const float* bp = nullptr;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    bias_f = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_f.numel() == out_features, "bias must have ", out_features, " values");
    bp = bias_f.data_ptr<float>();
  }
  if (m == 0) return out;
  const float* xp = xf.data_ptr<float>();
  auto run = [&](auto* y) {
    if (packed.scalar_type() == at::kBFloat16)
      linear_kernel(xp, m, k, packed.data_ptr<at::BFloat16>(), tiles, bp, y, out_features);
    else if (packed.scalar_type() == at::kFloat)
      linear_kernel(xp, m, k, packed.data_ptr<float>(), tiles, bp, y, out_features);
    else
      TORCH_CHECK(false, "packed weight must be float32 or bfloat16");
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(out.data_ptr<float>()); break;
    case at::kBFloat16: run(out.data_ptr<at::BFloat16>()); break;
    case at::kHalf: run(out.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "invariant_linear supports float32, bfloat16 and float16");
  }
  return out;
}

}  // namespace

void register_invariant_linear(pybind11::module& m) {
  m.def("invariant_linear", &invariant_linear, "x @ W.T (+ bias), each output summed in one fixed order");
}
