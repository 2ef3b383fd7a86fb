// Many-row matrix products on CPUs without native 16-bit products (prefill on AVX2-only CPUs):
// y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), x in fp32, bf16 or fp16, W in one of those or int8 /
// int4 weight-only quantized (the layers' canonical buffers), every product and sum in fp32, y
// rounded once (round to nearest even) to x's dtype.
//
// torch's alternative there is MKL's SGEMM on operands widened (or dequantized) to fp32 beforehand,
// one more pass over the weights; on Zen 4 MKL ran at 60-75% of the FMA peak. This is a blocked GEMM
// in the usual shape: the weights and activations are widened (the weights dequantized) while they
// are packed into panels, and a 6 x 16 register tile (12 ymm accumulators; per k, 2 weight loads,
// 6 broadcasts, 12 FMAs) runs over them:
//   for each block of about kMc activation rows (the blocks of one call as even as the 6-row tile
//   allows; one after the other):
//     the threads pack the block's activations, all of K, into 6-row panels (once: every column
//     block reads them; packing them per column block cost 5-8% of a Qwen-1.8B prefill on Zen 3),
//     each thread takes blocks of columns (nc weight rows, a multiple of 16):
//       for each block of kKc k:
//         for each 16-column panel: pack the weights [16 x kc] (16 KiB fp32, L1), then run the tile
//         over every activation panel of that k block, accumulating into an fp32 [mc x nc] buffer;
//       add the bias, round once, store.
// Every output is the same fixed-order fp32 sum whatever M, the tiling or the thread count: one FMA
// chain per output over k, in k-blocks of kKc (a row's result does not depend on the rows with it).
// Only AVX2 + FMA + F16C is used (256-bit FMA: on Zen 4 as fast as AVX-512's, which it double-pumps;
// qwen.kernels.gemm_runs says where it is used).

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>

#include "common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QG_X86 1
#include <immintrin.h>
#define QG_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define QG_X86 0
#endif

namespace qwen_kernels {
int64_t cpu_isa();  // cpu_gemv.cpp
}

namespace {

#if QG_X86

constexpr int kMr = 6;      // activation rows per register tile
constexpr int kNr = 16;     // weight rows (output columns) per register tile: two ymm
constexpr int kKc = 256;    // k per packed block: a weight panel is kKc x 16 fp32 = 16 KiB (L1)
constexpr int kMc = 480;    // most activation rows per block (a multiple of kMr)
constexpr int kNc = 256;    // most columns per thread block (a multiple of kNr)

// 8 consecutive elements as fp32.
QG_AVX2 inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
QG_AVX2 inline __m256 widen8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
QG_AVX2 inline __m256 widen8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// 8 fp32 rounded to nearest even into `p`, as c10's conversions do (NaN stays NaN).
QG_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
QG_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
QG_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  // 8 x 32-bit lanes holding 16-bit values -> 8 x 16 bits (packus keeps each 128-bit half's order).
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Transposes the 8 x 8 fp32 block r[0..7] (r[i] = row i) in place: r[j] becomes column j.
QG_AVX2 inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 s[8];
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      s[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
      s[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Where the weights come from: element (n, k) as fp32, eight at a time (k a multiple of 8) or one.
template <typename T>
struct Dense {  // fp32, bf16 or fp16 [N, K], row stride ld
  const T* w;
  int64_t ld;
  QG_AVX2 __m256 load8(int64_t n, int64_t k) const { return widen8(w + n * ld + k); }
  float at(int64_t n, int64_t k) const { return to_float(w[n * ld + k]); }
};

struct Int8Rows {  // q int8 [N, K] times scale[n] (fp32, one rounding)
  const int8_t* q;
  int64_t ld;
  const float* scale;
  QG_AVX2 __m256 load8(int64_t n, int64_t k) const {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * ld + k));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), _mm256_set1_ps(scale[n]));
  }
  float at(int64_t n, int64_t k) const { return static_cast<float>(q[n * ld + k]) * scale[n]; }
};

struct Int4Groups {  // nibbles [N, K/2] (element 2j low, 2j+1 high) times scales + mins [N, K/g] (one fused rounding)
  const uint8_t* packed;
  int64_t ld;  // K / 2
  const float* scales;
  const float* mins;
  int64_t groups;  // K / g
  int64_t g;       // a multiple of 8: eight k never straddle two groups
  QG_AVX2 __m256 load8(int64_t n, int64_t k) const {
    int32_t four;
    std::memcpy(&four, packed + n * ld + k / 2, 4);
    // bytes b0..b3 -> [b0 b0 b1 b1 b2 b2 b3 b3] as int32 -> shift the odd lanes by 4 -> low nibbles.
    const __m128i twice = _mm_shuffle_epi8(_mm_cvtsi32_si128(four), _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1,
                                                                                    -1, -1, -1, -1, -1));
    const __m256i shifted = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(twice), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(shifted, _mm256_set1_epi32(0xf)));
    const int64_t at = n * groups + k / g;
    return _mm256_fmadd_ps(q, _mm256_set1_ps(scales[at]), _mm256_set1_ps(mins[at]));
  }
  float at(int64_t n, int64_t k) const {
    const int q = (packed[n * ld + k / 2] >> (4 * (k & 1))) & 0xf;
    return std::fma(static_cast<float>(q), scales[n * groups + k / g], mins[n * groups + k / g]);
  }
};

// Weight rows n0 .. n0+rows-1 (rows <= 16), k0 .. k0+kc-1 -> panel[k * 16 + j] in fp32, the rows
// past `rows` zero. Eight k at a time as two 8 x 8 transposes.
template <typename W>
QG_AVX2 void pack_weights(const W& w, int64_t n0, int rows, int64_t k0, int kc, float* panel) {
  int k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int half = 0; half < 2; ++half) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        const int row = half * 8 + i;
        r[i] = row < rows ? w.load8(n0 + row, k0 + k) : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k + i) * kNr + half * 8, r[i]);
    }
  }
  for (; k < kc; ++k)
    for (int j = 0; j < kNr; ++j) panel[k * kNr + j] = j < rows ? w.at(n0 + j, k0 + k) : 0.f;
}

// Activation rows m0 .. m0+rows-1, k0 .. k0+kc-1 -> 6-row panels: panel p holds [k * 6 + i] for
// row m0 + 6p + i, the rows past `rows` zero.
template <typename TX>
QG_AVX2 void pack_activations(const TX* x, int64_t ldx, int64_t m0, int rows, int64_t k0, int kc, float* out) {
  const int panels = (rows + kMr - 1) / kMr;
  for (int p = 0; p < panels; ++p) {
    float* dst = out + p * kMr * kc;
    if ((p + 1) * kMr <= rows && kc % 8 == 0) {
      // Eight k of the six rows at a time: an 8 x 8 transpose (rows 6 and 7 zero), each column stored
      // as 8 floats at dst + k * 6, its last two spilling into the next k (written next) or the next
      // panel (written later; the buffer has room after the last). 1.07-1.09x the whole GEMM's speed
      // over one scalar store per element (Qwen-1.8B layers, M = 512, AVX2 caps on Zen 4).
      const TX* src = x + (m0 + p * kMr) * ldx + k0;
      for (int k = 0; k < kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < kMr; ++i) r[i] = widen8(src + i * ldx + k);
        r[6] = r[7] = _mm256_setzero_ps();
        transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * kMr, r[j]);
      }
      continue;
    }
    for (int i = 0; i < kMr; ++i) {
      const int row = p * kMr + i;
      if (row < rows) {
        const TX* src = x + (m0 + row) * ldx + k0;
        int k = 0;
        alignas(32) float v[8];
        for (; k + 8 <= kc; k += 8) {
          _mm256_store_ps(v, widen8(src + k));
          for (int e = 0; e < 8; ++e) dst[(k + e) * kMr + i] = v[e];
        }
        for (; k < kc; ++k) dst[k * kMr + i] = to_float(src[k]);
      } else {
        for (int k = 0; k < kc; ++k) dst[k * kMr + i] = 0.f;
      }
    }
  }
}

// The register tile: c[6 x 16] (row stride ldc) = (first ? 0 : c) + a-panel . w-panel over kc.
// Twelve named accumulators, not an array: GCC keeps an array on the stack, storing after every FMA.
QG_AVX2 void tile(const float* a, const float* b, int kc, float* c, int64_t ldc, bool first) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kc; ++k, a += kMr, b += kNr) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 x;
#define QG_ROW(i)                            \
  x = _mm256_broadcast_ss(a + i);            \
  c##i##0 = _mm256_fmadd_ps(x, b0, c##i##0); \
  c##i##1 = _mm256_fmadd_ps(x, b1, c##i##1);
    QG_ROW(0) QG_ROW(1) QG_ROW(2) QG_ROW(3) QG_ROW(4) QG_ROW(5)
#undef QG_ROW
  }
#define QG_OUT(i)                                                                        \
  if (first) {                                                                           \
    _mm256_storeu_ps(c + i * ldc, c##i##0);                                              \
    _mm256_storeu_ps(c + i * ldc + 8, c##i##1);                                          \
  } else {                                                                               \
    _mm256_storeu_ps(c + i * ldc, _mm256_add_ps(_mm256_loadu_ps(c + i * ldc), c##i##0)); \
    _mm256_storeu_ps(c + i * ldc + 8, _mm256_add_ps(_mm256_loadu_ps(c + i * ldc + 8), c##i##1)); \
  }
  QG_OUT(0) QG_OUT(1) QG_OUT(2) QG_OUT(3) QG_OUT(4) QG_OUT(5)
#undef QG_OUT
}

// 32-byte aligned scratch of n floats (not initialized), and 8 more that may be written
// (pack_activations' spill).
struct Aligned {
  std::unique_ptr<float[]> store;
  float* data;
  explicit Aligned(size_t n) : store(new float[n + 16]) {
    data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(store.get()) + 31) & ~uintptr_t(31));
  }
};

struct Block {
  int64_t m0;  // first activation row
  int mb;      // activation rows (<= kMc)
  int64_t n0;  // first weight row (output column)
  int nw;      // weight rows (<= nc)
  int64_t nc;  // the accumulator's row stride
};

// The packed activations of a row block: k block kb's panels start at kb * k_block_floats(rows),
// 16 floats apart from the next block's so that packing blocks in parallel never writes into a
// neighbour (pack_activations' spill).
inline int64_t k_block_floats(int64_t rows) { return rows * kKc + 16; }

// Outputs rows m0 .. m0+mb-1, columns n0 .. n0+nw-1 from packed_x (the row block's activations, as
// above), panel kKc x 16 and acc (mb rounded up to 6) x nc floats, all 32-byte aligned.
template <typename W, typename TY>
QG_AVX2 void column_block(const W& w, const float* bias, TY* y, int64_t ldy, int64_t K, const Block& b,
                          const float* packed_all, float* panel, float* acc) {
  const int panels = (b.mb + kMr - 1) / kMr;
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int kc = static_cast<int>(std::min<int64_t>(kKc, K - k0));
    const float* packed_x = packed_all + k0 / kKc * k_block_floats(panels * kMr);
    for (int j = 0; j < b.nw; j += kNr) {
      pack_weights(w, b.n0 + j, std::min(kNr, b.nw - j), k0, kc, panel);
      for (int p = 0; p < panels; ++p) tile(packed_x + p * kMr * kc, panel, kc, acc + p * kMr * b.nc + j, b.nc, k0 == 0);
    }
  }
  // Bias, one rounding, store.
  for (int i = 0; i < b.mb; ++i) {
    const float* src = acc + static_cast<int64_t>(i) * b.nc;
    TY* dst = y + (b.m0 + i) * ldy + b.n0;
    int j = 0;
    for (; j + 8 <= b.nw; j += 8) {
      __m256 v = _mm256_loadu_ps(src + j);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + b.n0 + j));
      store8(dst + j, v);
    }
    for (; j < b.nw; ++j) dst[j] = TY(src[j] + (bias ? bias[b.n0 + j] : 0.f));
  }
}

template <typename TX, typename W, typename TY>
void gemm_avx2(const TX* x, int64_t ldx, const W& w, const float* bias, TY* y, int64_t ldy, int64_t M, int64_t N,
               int64_t K) {
  // Column blocks: as many as the threads (or a multiple), none wider than kNc.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t blocks = (N + kNc - 1) / kNc;
  blocks = (blocks + threads - 1) / threads * threads;
  const int64_t nc = std::max<int64_t>(kNr, ((N + blocks - 1) / blocks + kNr - 1) / kNr * kNr);
  blocks = (N + nc - 1) / nc;
  // Row blocks of at most kMc rows, as even as the tile allows (M = 512: 258 + 254, not 480 + 32,
  // whose 32 rows would pack every weight again for little work).
  const int64_t row_blocks = (M + kMc - 1) / kMc;
  const int64_t block_rows = ((M + row_blocks - 1) / row_blocks + kMr - 1) / kMr * kMr;
  const int64_t k_blocks = (K + kKc - 1) / kKc;
  Aligned packed_x(static_cast<size_t>(k_blocks * k_block_floats(block_rows)));
  for (int64_t m0 = 0; m0 < M; m0 += block_rows) {
    const int mb = static_cast<int>(std::min<int64_t>(block_rows, M - m0));
    const int64_t rows = (mb + kMr - 1) / kMr * kMr;
    at::parallel_for(0, k_blocks, 1, [&](int64_t kb0, int64_t kb1) {
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int kc = static_cast<int>(std::min<int64_t>(kKc, K - kb * kKc));
        pack_activations(x, ldx, m0, mb, kb * kKc, kc, packed_x.data + kb * k_block_floats(rows));
      }
    });
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      Aligned panel(kKc * kNr), acc(static_cast<size_t>(rows * nc));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const Block b{m0, mb, blk * nc, static_cast<int>(std::min<int64_t>(nc, N - blk * nc)), nc};
        column_block(w, bias, y, ldy, K, b, packed_x.data, panel.data, acc.data);
      }
    });
  }
}

// y = x @ W^T (+ bias) for x of any of the three dtypes (y in the same).
template <typename W>
void run_gemm(const at::Tensor& x, const W& w, int64_t N, const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1);
  switch (kind_of(x)) {
    case kF32:
      return gemm_avx2(x.data_ptr<float>(), x.stride(0), w, bias, y.data_ptr<float>(), y.stride(0), M, N, K);
    case kBF16: {
      const auto* xs = static_cast<const c10::BFloat16*>(x.data_ptr());
      return gemm_avx2(xs, x.stride(0), w, bias, static_cast<c10::BFloat16*>(y.data_ptr()), y.stride(0), M, N, K);
    }
    default: {
      const auto* xs = static_cast<const c10::Half*>(x.data_ptr());
      return gemm_avx2(xs, x.stride(0), w, bias, static_cast<c10::Half*>(y.data_ptr()), y.stride(0), M, N, K);
    }
  }
}

#endif  // QG_X86

// A 2-D CPU tensor whose last dimension is contiguous.
bool rows_contiguous(const at::Tensor& t) {
  return plain_cpu(t) && t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= t.size(1);
}

bool contiguous_of(const at::Tensor& t, at::ScalarType type, int64_t rows, int64_t cols) {
  return plain_cpu(t) && t.scalar_type() == type && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
         t.is_contiguous();
}

// What every entry point checks of x [M, K] (rows contiguous, fp32/bf16/fp16), bias (absent or [N]
// fp32/bf16/fp16), out (absent or [M, N] of x's dtype, rows contiguous) for N outputs; `grad`: some
// weight tensor requires grad. False where autograd would have a graph to record.
bool operands_supported(const at::Tensor& x, int64_t N, int64_t K, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& out, bool grad) {
  if (!rows_contiguous(x) || kind_of(x) == kNone || x.size(1) != K || x.size(0) == 0 || N == 0 || K == 0) return false;
  grad = grad || x.requires_grad();
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    if (!plain_cpu(b) || b.dim() != 1 || b.size(0) != N || kind_of(b) == kNone) return false;
    grad = grad || b.requires_grad();
  }
  if (out.has_value() && out->defined()) {
    const at::Tensor& o = *out;
    if (!rows_contiguous(o) || o.scalar_type() != x.scalar_type() || o.size(0) != x.size(0) || o.size(1) != N)
      return false;
    grad = grad || o.requires_grad();
  }
  return !(grad && at::GradMode::is_enabled());
}

// Whether gemm takes these: w [N, K] with contiguous rows, fp32/bf16/fp16, and operands_supported.
bool gemm_supported(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& out) {
  return rows_contiguous(w) && kind_of(w) != kNone && x.dim() == 2 &&
         operands_supported(x, w.size(0), w.size(1), bias, out, w.requires_grad());
}

void check_level(int64_t isa) {
  TORCH_CHECK(isa >= kAvx2 && isa <= qwen_kernels::cpu_isa(), "qwen kernels: level ", isa,
              " is not available on this CPU (best ", qwen_kernels::cpu_isa(), ")");
}

// Runs y = x @ W^T (+ bias) for the weights `w` (a Dense/Int8Rows/Int4Groups); y is `out` or new.
template <typename W>
at::Tensor product(const at::Tensor& x, const W& w, int64_t N, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& out) {
  at::Tensor y = out.has_value() && out->defined() ? *out : at::empty({x.size(0), N}, x.options());
#if QG_X86
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  run_gemm(x, w, N, b.defined() ? b.data_ptr<float>() : nullptr, y);
#endif
  return y;
}

// y = x @ w.T (+ bias), fp32 products and sums, rounded once to x's dtype, written into `out` when
// given (which may be a column slice of a wider tensor); std::nullopt when gemm_supported says no.
std::optional<at::Tensor> gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& out, int64_t isa) {
  check_level(isa);
  if (!gemm_supported(x, w, bias, out)) return std::nullopt;
#if QG_X86
  switch (kind_of(w)) {
    case kF32:
      return product(x, Dense<float>{w.data_ptr<float>(), w.stride(0)}, w.size(0), bias, out);
    case kBF16:
      return product(x, Dense<c10::BFloat16>{static_cast<const c10::BFloat16*>(w.data_ptr()), w.stride(0)}, w.size(0),
                     bias, out);
    default:
      return product(x, Dense<c10::Half>{static_cast<const c10::Half*>(w.data_ptr()), w.stride(0)}, w.size(0), bias,
                     out);
  }
#else
  return std::nullopt;
#endif
}

// The same for int8 weights: w~[n, k] = qweight[n, k] * scale[n] in fp32 (int8 [N, K] and fp32 [N],
// contiguous), dequantized as they are packed.
std::optional<at::Tensor> gemm_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out,
                                    int64_t isa) {
  check_level(isa);
  if (qweight.dim() != 2 || x.dim() != 2) return std::nullopt;
  const int64_t N = qweight.size(0), K = qweight.size(1);
  if (!contiguous_of(qweight, at::kChar, N, K) || !plain_cpu(scale) || scale.scalar_type() != at::kFloat ||
      scale.dim() != 1 || scale.size(0) != N || !scale.is_contiguous() ||
      !operands_supported(x, N, K, bias, out, scale.requires_grad()))
    return std::nullopt;
#if QG_X86
  return product(x, Int8Rows{qweight.data_ptr<int8_t>(), K, scale.data_ptr<float>()}, N, bias, out);
#else
  return std::nullopt;
#endif
}

// The same for int4 weights: w~[n, k] = q * scales[n, k / g] + mins[n, k / g] with one fp32 rounding,
// q the nibbles of packed [N, K / 2] (element 2j low, 2j + 1 high); scales, mins fp32 [N, K / g].
std::optional<at::Tensor> gemm_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                    const at::Tensor& mins, int64_t group, const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& out, int64_t isa) {
  check_level(isa);
  if (packed.dim() != 2 || x.dim() != 2 || group < 8 || group % 8) return std::nullopt;
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  if (K % group || !contiguous_of(packed, at::kByte, N, K / 2) || !contiguous_of(scales, at::kFloat, N, K / group) ||
      !contiguous_of(mins, at::kFloat, N, K / group) ||
      !operands_supported(x, N, K, bias, out, scales.requires_grad() || mins.requires_grad()))
    return std::nullopt;
#if QG_X86
  const Int4Groups w{packed.data_ptr<uint8_t>(), K / 2, scales.data_ptr<float>(), mins.data_ptr<float>(), K / group,
                     group};
  return product(x, w, N, bias, out);
#else
  return std::nullopt;
#endif
}

}  // namespace

namespace qwen_kernels {
void bind_gemm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gemm_supported", &gemm_supported, "whether gemm takes these tensors", py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("out"));
  m.def("gemm", &gemm, "y = x @ w.T (+ bias) in fp32 products, rounded once to x's dtype; None when not supported",
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gemm_int8", &gemm_int8, "gemm for int8 weights (qweight * scale); None when not supported", py::arg("x"),
        py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("out"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("gemm_int4", &gemm_int4, "gemm for int4 weights (q * scales + mins); None when not supported", py::arg("x"),
        py::arg("packed"), py::arg("scales"), py::arg("mins"), py::arg("group"), py::arg("bias"), py::arg("out"),
        py::arg("isa"), py::call_guard<py::gil_scoped_release>());
}
}  // namespace qwen_kernels
