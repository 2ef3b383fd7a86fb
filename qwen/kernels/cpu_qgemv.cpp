// Small-M products with weight-only quantized weights on x86 CPUs: y[M, N] = x[M, K] @ W~[N, K]^T
// (+ bias[N]) for M = 1..16 bf16 activation rows, W~ the weights of qwen/quantization.py read from
// its canonical buffers as they are (no repacked copy):
//   int8: qweight int8 [N, K], scale fp32 [N]:           W~[n, k] = q[n, k] * scale[n]
//   int4: packed uint8 [N, K/2] (low nibble = even k), scales, mins fp32 [N, K/g]:
//                                                        W~[n, k] = q[n, k] * scales[n, k/g] + mins[n, k/g]
// Sums in fp32, y rounded once (to nearest even) to bf16.
//
// Approach: the weights are widened to exact floating-point values on the fly and multiplied with
// the activations as they are (no activation rounding: bf16 x times a small integer q is exact in
// fp32), summed in fp32:
//   int8: y = scale[n] * sum_k q[n, k] x[k]                    (one fp32 multiply per output)
//   int4: y = sum_g (scales[n, g] * sum_{k in g} q[n, k] x[k] + mins[n, g] * sum_{k in g} x[k])
// so each output equals the dot product of x with the canonical weights up to fp32 rounding of the
// sums (relative to sum_k |x_k| (|q| s + |m|), see tests/test_kernels.py for the bound). Approach (a)
// everywhere but level 1, which takes approach (c) (below; it adds at most 2^-16 of each group's
// largest |x| per activation).
//
// Paths (the level is chosen at run time by the caller, at most what cpu_isa() reports):
//   3 avx512_bf16: int8: VPMOVSXBD + VCVTDQ2PS (exact), VCVTNE2PS2BF16 (exact: |q| <= 127), then
//                  VDPBF16PS with the raw bf16 activations. int4: nibbles -> exact bf16 values of q
//                  with one VPERMW (a 16-entry table), then VDPBF16PS (two independent chains, even
//                  and odd k). With exact=false and AVX512_VNNI, int4 takes approach (b) instead
//                  (I4Vnni below: activations rounded to int8, VPDPBUSD).
//   2 avx512:      int8: VPMOVSXBD + VCVTDQ2PS + FMA on 16 lanes; int4: VPMOVZXBD, mask and shift
//                  for the two nibbles, VCVTDQ2PS, FMA with fp32 activations.
//   1 avx2:        int8: approach (c) (I8Fixed16 below: VPMOVSXBW, VPMADDWD, groups of 128; 1.9x the
//                  rate of approach (a) on 8 lanes, which it replaced). int4: approach (c) (I4Fixed16
//                  below): activations as int16 in a power-of-two unit per group (exact for every x
//                  within 2^7 of its group's largest |x|), VPMADDWD, exact int32 group sums: 1.3x
//                  the decode speed of (a) on 8 lanes, which it replaced.
//   With exact=false, int4 at levels 1 and 2 takes approach (b) with VPMADDUBSW (I4Avx2Int8 below).
// Activations are prepared once per call (bf16 -> fp32, or kept bf16 at level 3 int4; the even k
// of each block of B weights before its odd k, the order in which the nibbles unpack), and each
// int4 group's sum of x is computed once per call.
//
// The driver is that of cpu_gemv.cpp: tiles of a few weight rows x a few activation rows, each
// weight tile read from memory once and applied to all M rows, N split over torch's threads with
// at::parallel_for. Every output is the same fixed-order fp32 computation whatever M, the tile or
// the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QQ_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <cmath>
#define QQ_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define QQ_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define QQ_AVX512VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define QQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define QQ_UNROLL _Pragma("unroll")
#else
#define QQ_UNROLL _Pragma("GCC unroll 16")
#endif
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define QQ_HAVE_BF16 1
#else
#define QQ_HAVE_BF16 0
#endif
#else
#define QQ_X86 0
#define QQ_UNROLL
#endif

namespace qwen_kernels {
int64_t cpu_isa();  // cpu_gemv.cpp: the best level this CPU offers (0 torch, 1 avx2, 2 avx512, 3 avx512_bf16)
void bind_quantized(pybind11::module_& m);
}  // namespace qwen_kernels

namespace {

using qwen_kernels::cpu_isa;

// AVX512_VNNI (CPUID.(EAX=7, ECX=0):ECX bit 11), for the int4 path at level 3. Every CPU with
// AVX512_BF16 so far has it; without it level 3 takes the exact bf16 int4 kernel.
bool has_vnni() {
#if QQ_X86
  static const bool vnni = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    return (c & (1u << 11)) != 0;
  }();
  return vnni;
#else
  return false;
#endif
}


constexpr int64_t kMinTaskBytes = int64_t(1) << 15;  // weight bytes a task covers at least
constexpr int64_t kPrefetchBytes = 8192;       // L2 prefetch distance on the first pass over a tile
constexpr int64_t kPageBytes = 4096;           // at M = 1, Path::kPrefetchLongRows: rows longer than this

struct QProblem {
  const uint8_t* w;     // int8 [N, K] or packed nibbles [N, K/2]
  int64_t row_bytes;    // bytes per weight row
  const float* scale;   // int8 [N]; int4 [N, G]
  const float* mins;    // int4 [N, G]
  int64_t N, K, M;
  int64_t G, g;         // int4: groups per row, group size
  const void* x;        // prepared activations [M, xs] (fp32, or bf16 bits)
  int64_t xs;
  const float* sx;      // int4: [M, G] the group sums of x
  const float* xd;      // int4 VNNI: [M, K/128, 16] the int8 activations' scale of each dot-product lane
  const int32_t* lane;  // int4 VNNI: [K/128, 18] each lane's group relative to the block's first, first, mask
  const void* bias;     // [N] or nullptr
  int bias_kind;
  c10::BFloat16* y;     // [M, N]
};

inline float bias_at(const QProblem& p, int64_t n) {
  switch (p.bias_kind) {
    case kF32:
      return static_cast<const float*>(p.bias)[n];
    case kBF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p.bias)[n]);
    case kF16:
      return static_cast<float>(static_cast<const c10::Half*>(p.bias)[n]);
    default:
      return 0.f;
  }
}

template <int NR, int NM>
inline void store(const QProblem& p, int64_t n, int64_t m, const float* out) {
  QQ_UNROLL
  for (int r = 0; r < NR; ++r) {
    const float b = bias_at(p, n + r);
    QQ_UNROLL
    for (int i = 0; i < NM; ++i) p.y[(m + i) * p.N + n + r] = c10::BFloat16(out[i * NR + r] + b);
  }
}

// ----------------------------------------------------------------------------- driver

// The first pass over a tile prefetches the weights kPrefetchBytes ahead into L2: at M > 1 always; at
// M = 1 where Path::kPrefetchOne. The int4 kernels do enough work per byte that, left to the
// hardware prefetcher, their reads and products take turns instead of overlapping: the prefetch made
// a Qwen-1.8B decode step's int4 products 4-8% faster at level 3 and 35-50% at levels 1 and 2
// (2 threads, Zen 4, interleaved in one process). The 16-lane int8 ones stream as fast or faster
// without, except I8x512 on rows longer than a 4 KiB page (kPrefetchLongRows: the hardware prefetcher
// stops at page boundaries); the AVX2 ones (I8Fixed16, and I8x256 before it) need it on every row.
template <class Path, int NR, int NM>
inline void tile_store(const QProblem& p, int64_t n, int64_t m, float* out) {
  if (m == 0 && (p.M > 1 || Path::kPrefetchOne || (Path::kPrefetchLongRows && p.row_bytes > kPageBytes)))
    Path::template tile<NR, NM, true>(p, n, m, out);
  else
    Path::template tile<NR, NM, false>(p, n, m, out);
  store<NR, NM>(p, n, m, out);
}

template <class Path, int NR, int NM>
inline void tile_rest(const QProblem& p, int64_t n, int64_t m, int64_t rest, float* out) {
  if constexpr (NM >= 1) {
    if (rest == NM)
      tile_store<Path, NR, NM>(p, n, m, out);
    else
      tile_rest<Path, NR, NM - 1>(p, n, m, rest, out);
  }
}

template <class Path, int NR>
inline void row_block(const QProblem& p, int64_t n, float* out) {
  int64_t m = 0;
  for (; m + Path::kM <= p.M; m += Path::kM) tile_store<Path, NR, Path::kM>(p, n, m, out);
  if (m < p.M) tile_rest<Path, NR, Path::kM - 1>(p, n, m, p.M - m, out);
}

// M = 1: tiles of Path::kRows1 weight rows (several independent accumulation chains, adjacent rows:
// one contiguous stretch of memory); M > 1: Path::kRows x Path::kM tiles. The leftover rows of a
// task go one at a time (the per-output computation is the same in every tile).
template <class Path>
void run(const QProblem& p) {
  constexpr int R1 = Path::kRows1, R = Path::kRows;
  const int rows = p.M == 1 ? R1 : R;
  const int64_t groups = (p.N + rows - 1) / rows;
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / (rows * p.row_bytes));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    float out[(R1 > R ? R1 : R) * Path::kM];
    int64_t n = g0 * rows;
    const int64_t n1 = std::min(g1 * rows, p.N);
    if (p.M == 1) {
      for (; n + R1 <= n1; n += R1) tile_store<Path, R1, 1>(p, n, 0, out);
      for (; n < n1; ++n) tile_store<Path, 1, 1>(p, n, 0, out);
    } else {
      for (; n + R <= n1; n += R) row_block<Path, R>(p, n, out);
      for (; n < n1; ++n) row_block<Path, 1>(p, n, out);
    }
  });
}

// ----------------------------------------------------------------------------- activations

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// x [M, K] bf16 bits -> [M, padded] of T (float, or bf16 bits kept as they are), padded with zeros
// to a multiple of `block`; with `split`, each block holds its even k first, then its odd k.
template <typename T>
void prepare_x(const uint16_t* x, int64_t M, int64_t K, int64_t block, bool split, std::vector<T>& out,
               int64_t* xs) {
  const int64_t padded = (K + block - 1) / block * block;
  out.assign(static_cast<size_t>(M * padded), T(0));
  const int64_t half = block / 2;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* src = x + m * K;
    T* dst = out.data() + m * padded;
    for (int64_t k = 0; k < K; ++k) {
      int64_t at = k;
      if (split) {
        const int64_t j = k % block;
        at = k - j + (j & 1 ? half : 0) + j / 2;
      }
      if constexpr (sizeof(T) == 2)
        dst[at] = src[k];
      else
        dst[at] = bf16_to_float(src[k]);
    }
  }
  *xs = padded;
}

// The sum of each group of g activations, in order, in fp32: [M, G].
void group_sums(const uint16_t* x, int64_t M, int64_t K, int64_t g, std::vector<float>& out) {
  const int64_t G = K / g;
  out.assign(static_cast<size_t>(M * G), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < G; ++j) {
      float s = 0.f;
      for (int64_t k = j * g; k < (j + 1) * g; ++k) s += bf16_to_float(x[m * K + k]);
      out[m * G + j] = s;
    }
}


// Approach (b)'s activations: x [M, K] bf16 -> int8 [M, padded to 128] split per 128 (even k, then
// odd k), one scale d = max |x| / 127 per block of 32 k (xq = round(x / d), ties to even; d = 0 for
// an all-zero block), and d per dot-product lane [M, K/128, 16] (lane L of block b covers k = 128 b
// + 8 L .. + 7). Also lane [K/128, 18]: the group of lane L relative to the block's first group,
// then the first group and the mask of the groups the block touches.
void prepare_vnni(const uint16_t* x, int64_t M, int64_t K, int64_t g, std::vector<int8_t>& xq,
                  std::vector<float>& xd, std::vector<int32_t>& lane, int64_t* xs) {
  const int64_t blocks = (K + 127) / 128, padded = blocks * 128;
  xq.assign(static_cast<size_t>(M * padded), 0);
  xd.assign(static_cast<size_t>(M * blocks * 16), 0.f);
  lane.assign(static_cast<size_t>(blocks * 18), 0);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = b * 128 / g, last = (std::min(b * 128 + 128, K) - 1) / g;
    for (int64_t L = 0; L < 16; ++L) {
      const int64_t k = b * 128 + 8 * L;
      lane[b * 18 + L] = k < K ? static_cast<int32_t>(k / g - first) : 0;
    }
    lane[b * 18 + 16] = static_cast<int32_t>(first);
    lane[b * 18 + 17] = static_cast<int32_t>((1u << (last - first + 1)) - 1);  // at most 4 groups
  }
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* src = x + m * K;
    int8_t* dst = xq.data() + m * padded;
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const int64_t k1 = std::min(k0 + 32, K);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(bf16_to_float(src[k])));
      const float d = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t j = k % 128;
        const int64_t at = k - j + (j & 1 ? 64 : 0) + j / 2;
        const float q = std::nearbyint(bf16_to_float(src[k]) * inv);
        dst[at] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, q)));
      }
      const int64_t b = k0 / 128, L0 = (k0 % 128) / 8;
      for (int64_t L = L0; L < L0 + 4; ++L) xd[(m * blocks + b) * 16 + L] = d;
    }
  }
  *xs = padded;
}

#if QQ_X86

// ----------------------------------------------------------------------------- int8

// int8 weights, 16 lanes: VPMOVSXBD + VCVTDQ2PS give the exact q as fp32; one accumulator per output.
// Activations fp32, zero padded to a multiple of 16. The scale multiplies the finished sum.
struct I8x512 {
  static constexpr int kRows1 = 1, kRows = 4, kM = 4;
  static constexpr bool kPrefetchOne = false;  // int8 at M = 1 streams as fast without (measured)
  static constexpr bool kPrefetchLongRows = true;  // K = 5504 rows: 1.34-1.41x (Zen 4, level 2)

  template <int NR, int NM, bool PF>
  QQ_AVX512 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t K = p.K;
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + n * K;
    const float* x = static_cast<const float*>(p.x) + m * p.xs;
    __m512 acc[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if constexpr (PF) {
        if ((k & 63) == 0) {
          QQ_UNROLL
          for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchBytes, _MM_HINT_T1);
        }
      }
      __m512 wv[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k))));
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * p.xs + k);
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
    if (k < K) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 wv[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + r * K + k)));
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * p.xs + k);  // zero padded
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) out[i * NR + r] = _mm512_reduce_add_ps(acc[i][r]) * p.scale[n + r];
  }
};

#if QQ_HAVE_BF16
// Level 3: int8 -> fp32 (exact) -> bf16 pairs with VCVTNE2PS2BF16 (exact: |q| <= 127 has 7
// significant bits), then VDPBF16PS with the raw bf16 activations: one product instruction per 32
// weights and activation row instead of two FMAs (at M = 1 the same cost, at M = 8 ~1.5x faster).
struct I8Bf16 {
  static constexpr int kRows1 = 1, kRows = 4, kM = 4;
  static constexpr bool kPrefetchOne = false;  // int8 at M = 1 streams as fast without (measured)
  static constexpr bool kPrefetchLongRows = false;

  template <int NR, int NM>
  QQ_AVX512BF16 static inline void dot(const __m512 (&lo)[NR], const __m512 (&hi)[NR], const uint16_t* x, int64_t xs,
                                       int64_t k, __mmask32 mask, __m512 (&acc)[NM][NR]) {
    __m512bh wb[NR];
    QQ_UNROLL
    for (int r = 0; r < NR; ++r) wb[r] = _mm512_cvtne2ps_pbh(hi[r], lo[r]);
    QQ_UNROLL
    for (int i = 0; i < NM; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * xs + k);
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv, wb[r]);
    }
  }

  template <int NR, int NM, bool PF>
  QQ_AVX512BF16 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t K = p.K;
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + n * K;
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + m * p.xs;
    __m512 acc[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512 lo[NR], hi[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) {
        const int8_t* at = w + r * K + k;
        if constexpr (PF) {
          if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T1);
        }
        lo[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at))));
        hi[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 16))));
      }
      dot<NR, NM>(lo, hi, x, p.xs, k, ~__mmask32(0), acc);
    }
    if (k < K) {
      const __mmask32 mask = static_cast<__mmask32>((uint32_t(1) << (K - k)) - 1);
      __m512 lo[NR], hi[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) {
        const int8_t* at = w + r * K + k;
        lo[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(mask), at)));
        hi[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(mask >> 16), at + 16)));
      }
      dot<NR, NM>(lo, hi, x, p.xs, k, mask, acc);
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) out[i * NR + r] = _mm512_reduce_add_ps(acc[i][r]) * p.scale[n + r];
  }
};
#endif  // QQ_HAVE_BF16

QQ_AVX2 inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// int8 weights, 8 lanes (AVX2): as I8x512; the last K % 8 weights are copied into a zero padded
// block (no byte-masked loads in AVX2).
// ----------------------------------------------------------------------------- int4

// Per output: for each group the dot product of q with x (one fp32 chain, or two at levels 1-2: even
// and odd k), then acc = fma(dot, scale_g, acc); the lanes of acc summed at the end, plus the min
// term sum_g mins[g] * sum_{k in g} x[k] (one vector dot product over the groups).

// sum_j mins[j] * sx[j] for j < G, in a fixed order (16 lanes, then their sum).
QQ_AVX512 inline float min_term512(const float* mins, const float* sx, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= G; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(mins + j), _mm512_loadu_ps(sx + j), acc);
  if (j < G) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (G - j)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, mins + j), _mm512_maskz_loadu_ps(mask, sx + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The same on 8 lanes (AVX2).
QQ_AVX2 inline float min_term256(const float* mins, const float* sx, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= G; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(mins + j), _mm256_loadu_ps(sx + j), acc);
  if (j < G) {
    float a[8] = {0}, b[8] = {0};
    std::memcpy(a, mins + j, static_cast<size_t>(G - j) * sizeof(float));
    std::memcpy(b, sx + j, static_cast<size_t>(G - j) * sizeof(float));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), acc);
  }
  return hsum256(acc);
}

#if QQ_HAVE_BF16
// bf16 values of 0..15 (VPERMW table; indices 16..31 unused).
alignas(64) const uint16_t kNibbleBf16[32] = {0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
                                              0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// Level 3: blocks of 64 weights (32 bytes): VPMOVZXBW puts byte j in word j; its low nibble is
// q[2j], its high nibble q[2j + 1]; VPERMW maps each to the bf16 value of q; VDPBF16PS multiplies
// word pairs with the activations (bf16, split per 64: even k, then odd k) exactly and sums into
// fp32 lanes: two chains per output and group (even k, odd k), added at the end of the group. Lanes 0-7 hold
// k 0..31 of the block, lanes 8-15 k 32..63: with groups of 32 the scale vector holds one group's
// scale in each half.
struct I4Bf16 {
  static constexpr int kRows1 = 1, kRows = 2, kM = 4;
  static constexpr bool kPrefetchOne = true;  // see the driver
  static constexpr bool kPrefetchLongRows = false;
  static constexpr int64_t kBlock = 64;

  template <int NR, int NM>
  QQ_AVX512BF16 static inline void dots(const __m256i (&bytes)[NR], const uint16_t* x, int64_t xs, int64_t k,
                                        __m512 (&lo)[NM][NR], __m512 (&hi)[NM][NR]) {
    const __m512i table = _mm512_load_si512(kNibbleBf16);
    const __m512i low4 = _mm512_set1_epi16(0x000F);
    QQ_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512i words = _mm512_cvtepu8_epi16(bytes[r]);
      const __m512i qe = _mm512_permutexvar_epi16(_mm512_and_si512(words, low4), table);
      const __m512i qo = _mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const __m512i xe = _mm512_loadu_si512(x + i * xs + k);
        const __m512i xo = _mm512_loadu_si512(x + i * xs + k + 32);
        lo[i][r] = _mm512_dpbf16_ps(lo[i][r], (__m512bh)xe, (__m512bh)qe);
        hi[i][r] = _mm512_dpbf16_ps(hi[i][r], (__m512bh)xo, (__m512bh)qo);
      }
    }
  }

  template <int NR, int NM, bool PF>
  QQ_AVX512BF16 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t K = p.K, G = p.G, g = p.g, rb = p.row_bytes;
    const uint8_t* w = p.w + n * rb;
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + m * p.xs;
    const float* s = p.scale + n * G;
    __m512 acc[NM][NR], lo[NM][NR], hi[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    if (g >= kBlock) {
      for (int64_t j = 0; j < G; ++j) {
        QQ_UNROLL
        for (int i = 0; i < NM; ++i)
          QQ_UNROLL
          for (int r = 0; r < NR; ++r) lo[i][r] = hi[i][r] = _mm512_setzero_ps();
        for (int64_t k = j * g; k < (j + 1) * g; k += kBlock) {
          __m256i bytes[NR];
          QQ_UNROLL
          for (int r = 0; r < NR; ++r) {
            const uint8_t* at = w + r * rb + k / 2;
            if constexpr (PF) {
              if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T1);
            }
            bytes[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
          }
          dots<NR, NM>(bytes, x, p.xs, k, lo, hi);
        }
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const __m512 sv = _mm512_set1_ps(s[r * G + j]);
          QQ_UNROLL
          for (int i = 0; i < NM; ++i) acc[i][r] = _mm512_fmadd_ps(_mm512_add_ps(lo[i][r], hi[i][r]), sv, acc[i][r]);
        }
      }
    } else {  // g == 32: two groups per block (the last block may hold only one)
      for (int64_t k = 0; k < K; k += kBlock) {
        const int64_t j = k / 32;
        const bool two = j + 1 < G;
        __m256i bytes[NR];
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const uint8_t* at = w + r * rb + k / 2;
          if constexpr (PF) {
            if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T1);
          }
          bytes[r] = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
                         : _mm256_maskz_loadu_epi8(0xFFFFu, at);
        }
        QQ_UNROLL
        for (int i = 0; i < NM; ++i)
          QQ_UNROLL
          for (int r = 0; r < NR; ++r) lo[i][r] = hi[i][r] = _mm512_setzero_ps();
        dots<NR, NM>(bytes, x, p.xs, k, lo, hi);
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[r * G + j]),
                                               _mm256_set1_ps(two ? s[r * G + j + 1] : 0.f), 1);
          QQ_UNROLL
          for (int i = 0; i < NM; ++i) acc[i][r] = _mm512_fmadd_ps(_mm512_add_ps(lo[i][r], hi[i][r]), sv, acc[i][r]);
        }
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r)
        out[i * NR + r] = _mm512_reduce_add_ps(acc[i][r]) + min_term512(p.mins + (n + r) * G, p.sx + (m + i) * G, G);
  }
};
#endif  // QQ_HAVE_BF16


// Level 3, approach (b) (llama.cpp's Q4_0 x Q8_0): the activations are rounded to int8 once per
// call, one fp32 scale d per block of 32 (d = max |x| / 127, xq = round(x / d)), and VPDPBUSD
// multiplies 64 unsigned nibbles by 64 signed int8 activations into 16 int32 lanes at once. A block
// is 128 weights (64 bytes): byte j holds k = 2j (low nibble) and 2j + 1 (high nibble), so lane L
// sums k = 8L .. 8L + 7 (activations split per 128: even k, then odd k). Per block and output:
//   acc = fma(float(lane sums), scale of the lane's group * d of the lane's x block, acc)
// and at the end the exact min term, as in the other int4 kernels. The integer sums are exact; the
// added error is that of the activation rounding, |x - d xq| <= d / 2 per element (see
// tests/test_kernels.py for the bound).
struct I4Vnni {
  static constexpr int kRows1 = 1, kRows = 2, kM = 4;
  static constexpr bool kPrefetchOne = true;  // see the driver
  static constexpr bool kPrefetchLongRows = false;
  static constexpr int64_t kBlock = 128;

  template <int NR, int NM, bool PF>
  QQ_AVX512VNNI static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t K = p.K, G = p.G, g = p.g, rb = p.row_bytes;
    const int64_t blocks = (K + kBlock - 1) / kBlock;
    const uint8_t* w = p.w + n * rb;
    const int8_t* x = static_cast<const int8_t*>(p.x) + m * p.xs;
    const float* s = p.scale + n * G;
    const float* xd = p.xd + m * blocks * 16;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t k = blk * kBlock;
      const int32_t* info = p.lane + blk * 18;  // 16 lane groups, the first group, the groups' mask
      const int64_t first = info[16];
      const __mmask16 gmask = static_cast<__mmask16>(info[17]);
      const __m512i lane = _mm512_loadu_si512(info);
      const bool full = k + kBlock <= K;
      const __mmask64 bmask = full ? ~__mmask64(0) : ((__mmask64(1) << ((K - k) / 2)) - 1);
      __m512i lo[NR], hi[NR];
      __m512 sv[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) {
        const uint8_t* at = w + r * rb + k / 2;
        if constexpr (PF) {
          _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T1);
        }
        const __m512i v = full ? _mm512_loadu_si512(at) : _mm512_maskz_loadu_epi8(bmask, at);
        lo[r] = _mm512_and_si512(v, low4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        sv[r] = _mm512_permutexvar_ps(lane, _mm512_maskz_loadu_ps(gmask, s + r * G + first));
      }
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const __m512i xe = _mm512_loadu_si512(x + i * p.xs + k);
        const __m512i xo = _mm512_loadu_si512(x + i * p.xs + k + 64);
        const __m512 dv = _mm512_loadu_ps(xd + (i * blocks + blk) * 16);
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xe);
          sum = _mm512_dpbusd_epi32(sum, hi[r], xo);
          acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(sv[r], dv), acc[i][r]);
        }
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r)
        out[i * NR + r] = _mm512_reduce_add_ps(acc[i][r]) + min_term512(p.mins + (n + r) * G, p.sx + (m + i) * G, G);
  }
};

// Level 2: blocks of 32 weights (16 bytes): VPMOVZXBD puts byte j in lane j; mask and shift give
// q[2j] and q[2j + 1] as int32, VCVTDQ2PS as fp32; FMA with the fp32 activations (split per 32).
struct I4x512 {
  static constexpr int kRows1 = 4, kRows = 2, kM = 4;
  static constexpr bool kPrefetchOne = true;  // see the driver
  static constexpr bool kPrefetchLongRows = false;
  static constexpr int64_t kBlock = 32;

  template <int NR, int NM, bool PF>
  QQ_AVX512 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t G = p.G, g = p.g, rb = p.row_bytes;
    const uint8_t* w = p.w + n * rb;
    const float* x = static_cast<const float*>(p.x) + m * p.xs;
    const float* s = p.scale + n * G;
    const __m512i low4 = _mm512_set1_epi32(0xF);
    __m512 acc[NM][NR], lo[NM][NR], hi[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      QQ_UNROLL
      for (int i = 0; i < NM; ++i)
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) lo[i][r] = hi[i][r] = _mm512_setzero_ps();
      for (int64_t k = j * g; k < (j + 1) * g; k += kBlock) {
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const uint8_t* at = w + r * rb + k / 2;
          if constexpr (PF) {
            if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T1);
          }
          const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
          const __m512 qe = _mm512_cvtepi32_ps(_mm512_and_si512(q, low4));
          const __m512 qo = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
          QQ_UNROLL
          for (int i = 0; i < NM; ++i) {
            lo[i][r] = _mm512_fmadd_ps(qe, _mm512_loadu_ps(x + i * p.xs + k), lo[i][r]);
            hi[i][r] = _mm512_fmadd_ps(qo, _mm512_loadu_ps(x + i * p.xs + k + 16), hi[i][r]);
          }
        }
      }
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) {
        const __m512 sv = _mm512_set1_ps(s[r * G + j]);
        QQ_UNROLL
        for (int i = 0; i < NM; ++i) acc[i][r] = _mm512_fmadd_ps(_mm512_add_ps(lo[i][r], hi[i][r]), sv, acc[i][r]);
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r)
        out[i * NR + r] = _mm512_reduce_add_ps(acc[i][r]) + min_term512(p.mins + (n + r) * G, p.sx + (m + i) * G, G);
  }
};

// Levels 1 and 2, approach (b) on AVX2 (no VNNI needed): the activations of prepare_vnni (int8 per
// block of 32, split per 128), taken 64 weights (32 bytes) at a time: VPMADDUBSW multiplies 32
// unsigned nibbles by 32 signed int8 activations into 16 pair sums (|.| <= 2 * 15 * 127, no
// saturation); the even and odd nibbles' pair sums are added (|.| <= 7620) and VPMADDWD by ones gives
// 8 int32 lanes, lane L holding k = 8L .. 8L + 7 of the 64 (the layout of I4Vnni's lanes, half a
// 128-block at a time). Per 64 weights and output:
//   acc = fma(float(lane sums), scale of the lane's group * d of the lane's x block, acc)
// then the exact min term. About a third of approach (a)'s vector operations per weight.
struct I4Avx2Int8 {
  static constexpr int kRows1 = 4, kRows = 2, kM = 2;
  static constexpr bool kPrefetchOne = true;  // see the driver
  static constexpr bool kPrefetchLongRows = false;
  static constexpr int64_t kBlock = 64;

  template <int NR, int NM, bool PF>
  QQ_AVX2 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t K = p.K, G = p.G, g = p.g, rb = p.row_bytes;
    const int64_t blocks = (K + 127) / 128;  // prepare_vnni's 128-blocks
    const uint8_t* w = p.w + n * rb;
    const int8_t* x = static_cast<const int8_t*>(p.x) + m * p.xs;
    const float* s = p.scale + n * G;
    const float* xd = p.xd + m * blocks * 16;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += kBlock) {
      const int64_t b = k / 128, h = (k / 64) & 1;  // 128-block, and which half of it
      const bool full = k + kBlock <= K;             // else 32 weights left (K is a multiple of 32)
      __m256i lo[NR], hi[NR];
      __m256 sv[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) {
        const uint8_t* at = w + r * rb + k / 2;
        if constexpr (PF) {
          if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T1);
        }
        const __m256i v = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))
                               : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
        lo[r] = _mm256_and_si256(v, low4);
        hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        if (g >= kBlock) {
          sv[r] = _mm256_set1_ps(s[r * G + k / g]);
        } else {  // g == 32: lanes 0-3 one group, 4-7 the next (none in a 32-weight tail)
          const int64_t j = k / 32;
          sv[r] = _mm256_set_m128(_mm_set1_ps(full ? s[r * G + j + 1] : 0.f), _mm_set1_ps(s[r * G + j]));
        }
      }
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const int8_t* xb = x + i * p.xs + b * 128 + 32 * h;
        const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
        const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64));
        const __m256 dv = _mm256_loadu_ps(xd + (i * blocks + b) * 16 + 8 * h);
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xe), _mm256_maddubs_epi16(hi[r], xo));
          const __m256i sum = _mm256_madd_epi16(pairs, ones);
          acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sv[r], dv), acc[i][r]);
        }
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r)
        out[i * NR + r] = hsum256(acc[i][r]) + min_term256(p.mins + (n + r) * G, p.sx + (m + i) * G, G);
  }
};

// round(x * inv) (ties to even) clamped to +-32767, as int32 lanes; x as fp32 bits.
QQ_AVX2 inline __m256i fixed16(__m256i bits, __m256 inv) {
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_castsi256_ps(bits), inv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(q, _mm256_set1_ps(32767.f)), _mm256_set1_ps(-32767.f)));
}

// Approach (c)'s activations: x [M, K] bf16 -> int16 [M, xs] (xs: K rounded up to 32, zero padded),
// in units of one power of two per group of g (the last group may be shorter: int8's K need not be
// a multiple of its g), d = 2^(e - 14) with 2^e <= max |x| of the group < 2^(e + 1): xi = round(x / d)
// (|xi| < 2^15). A bf16 x has 8 significant bits, so xi is exact for every x within 2^7 of its
// group's largest |x|; smaller ones lose bits below d: |x - d xi| <= d / 2 <= 2^-15 max |x|. Also
// d [M, G] (0 for an all-zero group, NaN for one holding an Inf or NaN). With `split` (int4), each
// 32 holds its 16 even k, then its 16 odd k (the order in which the nibbles unpack); else k order.
// Vector code, 32 activations at a time: a scalar loop (nearbyint per activation, a libm call in a
// file built for baseline x86-64) took 25-50 us per call at K = 2048-5504, ~4 ms of a Qwen-1.8B int4
// decode step of 50 ms (Zen 3).
QQ_AVX2 void prepare_fixed16(const uint16_t* x, int64_t M, int64_t K, int64_t g, bool split, std::vector<int16_t>& xi,
                             std::vector<float>& d, int64_t* xs) {
  const int64_t G = (K + g - 1) / g, padded = (K + 31) / 32 * 32;  // g is 32 or a multiple of 64
  xi.assign(static_cast<size_t>(M * padded), 0);
  d.assign(static_cast<size_t>(M * G), 0.f);
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), top = _mm256_set1_epi32(int32_t(0xffff0000u));
  const __m256i largest_finite = _mm256_set1_epi32(0x7f7fffff);
  alignas(32) uint16_t tail[256];  // a short last group, zero padded to 32 (g <= 256 where K % g != 0)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < G; ++j) {
      const uint16_t* src = x + m * K + j * g;
      const int64_t length = std::min(g, K - j * g), span = (length + 31) / 32 * 32;
      if (length % 32 != 0) {
        TORCH_CHECK(span <= 256, "prepare_fixed16: a partial group longer than 256");
        std::memset(tail, 0, sizeof(tail));
        std::memcpy(tail, src, static_cast<size_t>(length) * sizeof(uint16_t));
        src = tail;
      }
      // |x| as fp32 bits (their integer order is the float order) and whether any is Inf/NaN.
      __m256i amax = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
      for (int64_t k = 0; k < span; k += 16) {
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        for (const __m256i bits : {_mm256_slli_epi32(pairs, 16), _mm256_and_si256(pairs, top)}) {
          const __m256i mag = _mm256_and_si256(bits, magnitude);
          amax = _mm256_max_epi32(amax, mag);
          bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(mag, largest_finite));
        }
      }
      if (!_mm256_testz_si256(bad, bad)) {  // the group's products are not finite in fp32 either: a NaN
        d[m * G + j] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), amax);
      int32_t most = 0;
      for (int32_t v : lanes) most = std::max(most, v);
      float biggest;
      std::memcpy(&biggest, &most, sizeof(biggest));
      if (biggest == 0.f) continue;  // all zeros: d = 0
      const int e = std::ilogb(biggest);
      d[m * G + j] = std::ldexp(1.f, e - 14);
      const __m256 inv = _mm256_set1_ps(std::ldexp(1.f, 14 - e));
      int16_t* dst = xi.data() + m * padded + j * g;
      for (int64_t k = 0; k < span; k += 32) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k + 16));
        // (even k of a, of b) and (odd k of a, of b) as int32 lanes; packs_epi32 interleaves the
        // 128-bit halves: permute them back.
        const __m256i ea = fixed16(_mm256_slli_epi32(a, 16), inv), eb = fixed16(_mm256_slli_epi32(b, 16), inv);
        const __m256i oa = fixed16(_mm256_and_si256(a, top), inv), ob = fixed16(_mm256_and_si256(b, top), inv);
        if (split) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(ea, eb), 0xD8));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k + 16),
                              _mm256_permute4x64_epi64(_mm256_packs_epi32(oa, ob), 0xD8));
        } else {  // interleave even and odd lanes back into k order: (e0 o0 e1 o1 ...) per 128-bit half
          const __m256i lo_a = _mm256_unpacklo_epi32(ea, oa), hi_a = _mm256_unpackhi_epi32(ea, oa);
          const __m256i lo_b = _mm256_unpacklo_epi32(eb, ob), hi_b = _mm256_unpackhi_epi32(eb, ob);
          // lo_a = k 0,1,2,3 | 8,9,10,11; hi_a = 4..7 | 12..15 (as int32): pack to int16 in k order.
          const __m256i first = _mm256_packs_epi32(lo_a, hi_a);   // 0..3 4..7 | 8..11 12..15
          const __m256i second = _mm256_packs_epi32(lo_b, hi_b);  // 16..23 | 24..31
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), first);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k + 16), second);
        }
      }
    }
  *xs = padded;
}

// Level 1, approach (c): the activations of prepare_fixed16 (int16, one power-of-two unit per group),
// 32 weights (16 bytes) at a time: VPMOVZXBW puts byte j in word j, whose low nibble is q[2j] and
// high nibble q[2j + 1]; VPMADDWD multiplies the words by the activations and adds pairs into 8 int32
// lanes, summed exactly over the group (|sum| <= 15 * 32767 * g < 2^31 for g <= 4096), then
//   acc = fma(float(group sum), scale * d of the group, acc)
// and the exact min term. Half of approach (a)'s vector operations per weight; the only error it
// adds is prepare_fixed16's (none for activations within 2^7 of their group's largest).
struct I4Fixed16 {
  static constexpr int kRows1 = 4, kRows = 2, kM = 2;
  static constexpr bool kPrefetchOne = true;  // see the driver
  static constexpr bool kPrefetchLongRows = false;

  // Row pointers step through each group (no index arithmetic or branch per block); the L2
  // prefetch is issued once per row and group: 1.1-1.25x the previous form, which tested every block
  // for a prefetch, same sums (Zen 3, 2048 x 2048 in cache, 1-2 threads, alternating).
  template <int NR, int NM, bool PF>
  QQ_AVX2 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t G = p.G, g = p.g, rb = p.row_bytes, xs = p.xs;
    const uint8_t* w = p.w + n * rb;
    const int16_t* x = static_cast<const int16_t*>(p.x) + m * xs;
    const float* s = p.scale + n * G;
    const float* d = p.xd + m * G;
    const __m256i low4 = _mm256_set1_epi16(0x000F);
    __m256 acc[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const uint8_t* wj = w + j * (g / 2);
      const int16_t* xj = x + j * g;
      if constexpr (PF) {
        QQ_UNROLL
        for (int r = 0; r < NR; ++r)
          for (int64_t b = 0; b < g / 2; b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(wj + r * rb + b) + kPrefetchBytes, _MM_HINT_T1);
      }
      __m256i sum[NM][NR];
      QQ_UNROLL
      for (int i = 0; i < NM; ++i)
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) sum[i][r] = _mm256_setzero_si256();
      for (const int16_t* end = xj + g; xj < end; wj += 16, xj += 32) {
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj + r * rb)));
          const __m256i qe = _mm256_and_si256(words, low4);
          const __m256i qo = _mm256_srli_epi16(words, 4);
          QQ_UNROLL
          for (int i = 0; i < NM; ++i) {
            const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xj + i * xs));
            const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xj + i * xs + 16));
            sum[i][r] = _mm256_add_epi32(sum[i][r], _mm256_add_epi32(_mm256_madd_epi16(qe, xe), _mm256_madd_epi16(qo, xo)));
          }
        }
      }
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const float dj = d[i * G + j];
        QQ_UNROLL
        for (int r = 0; r < NR; ++r)
          acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i][r]), _mm256_set1_ps(s[r * G + j] * dj), acc[i][r]);
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r)
        out[i * NR + r] = hsum256(acc[i][r]) + min_term256(p.mins + (n + r) * G, p.sx + (m + i) * G, G);
  }
};

// int8 at level 1, approach (c) as I4Fixed16: the activations of prepare_fixed16 in k order, one unit
// per group of kGroup, VPMOVSXBW widens 16 weights to words, VPMADDWD multiplies them with the
// activations and adds pairs into int32 lanes, summed exactly over the group (|sum| <= 128 * 32767 *
// kGroup < 2^31), then acc = fma(float(group sum), d of the group, acc) and y = scale * sum of acc.
// Half the vector operations per weight of the approach (a) kernel it replaced (I8x256: widen to
// int32, convert, FMA per 8 weights), which could not keep up with memory on two Zen 3 cores: 2048 x
// 2048 in cache, single thread, ~27 vs ~14 G weights/s. The only error it adds is prepare_fixed16's.
struct I8Fixed16 {
  static constexpr int kRows1 = 4, kRows = 2, kM = 2;
  static constexpr bool kPrefetchOne = true;
  static constexpr bool kPrefetchLongRows = false;
  static constexpr int64_t kGroup = 128;

  template <int NR, int NM>
  QQ_AVX2 static inline void block(const int8_t* const (&rows)[NR], const int16_t* x, int64_t xs,
                                   __m256i (&sum)[NM][NR]) {
    QQ_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r])));
      const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + 16)));
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * xs));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * xs + 16));
        sum[i][r] = _mm256_add_epi32(sum[i][r], _mm256_add_epi32(_mm256_madd_epi16(a, x0), _mm256_madd_epi16(b, x1)));
      }
    }
  }

  template <int NR, int NM, bool PF>
  QQ_AVX2 static void tile(const QProblem& p, int64_t n, int64_t m, float* out) {
    const int64_t K = p.K, G = p.G, xs = p.xs;
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + n * K;
    const int16_t* x = static_cast<const int16_t*>(p.x) + m * xs;
    const float* d = p.xd + m * G;
    __m256 acc[NM][NR];
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const int64_t k0 = j * kGroup, k1 = std::min(K, k0 + kGroup);
      if constexpr (PF) {
        QQ_UNROLL
        for (int r = 0; r < NR; ++r)
          for (int64_t b = 0; b < kGroup; b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k0 + b) + kPrefetchBytes, _MM_HINT_T1);
      }
      __m256i sum[NM][NR];
      QQ_UNROLL
      for (int i = 0; i < NM; ++i)
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) sum[i][r] = _mm256_setzero_si256();
      const int8_t* rows[NR];
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) rows[r] = w + r * K + k0;
      int64_t k = k0;
      for (; k + 32 <= k1; k += 32) {
        block<NR, NM>(rows, x + k, xs, sum);
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) rows[r] += 32;
      }
      if (k < k1) {  // the last < 32 weights of each row, zero padded (x is zero padded to 32)
        int8_t padded[NR][32];
        const int8_t* tails[NR];
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) {
          std::memset(padded[r], 0, sizeof(padded[r]));
          std::memcpy(padded[r], rows[r], static_cast<size_t>(k1 - k));
          tails[r] = padded[r];
        }
        block<NR, NM>(tails, x + k, xs, sum);
      }
      QQ_UNROLL
      for (int i = 0; i < NM; ++i) {
        const __m256 dj = _mm256_set1_ps(d[i * G + j]);
        QQ_UNROLL
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i][r]), dj, acc[i][r]);
      }
    }
    QQ_UNROLL
    for (int i = 0; i < NM; ++i)
      QQ_UNROLL
      for (int r = 0; r < NR; ++r) out[i * NR + r] = hsum256(acc[i][r]) * p.scale[n + r];
  }
};

#endif  // QQ_X86

// ----------------------------------------------------------------------------- entry points

bool plain_contiguous(const at::Tensor& t, at::ScalarType type) {
  return plain_cpu(t) && t.scalar_type() == type && t.is_contiguous();
}

// x: bf16 [..., K] with 1..kMaxRows rows; bias absent or [N] fp32/bf16/fp16; no graph to record.
bool activations_ok(const at::Tensor& x, int64_t K, int64_t N, const std::optional<at::Tensor>& bias) {
  if (!plain_cpu(x) || x.scalar_type() != at::kBFloat16 || x.dim() < 1 || x.size(-1) != K) return false;
  const int64_t M = x.numel() / K;
  if (M < 1 || M > kMaxRows) return false;
  bool grad = x.requires_grad();
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    if (!plain_cpu(b) || b.dim() != 1 || b.size(0) != N || kind_of(b) == kNone) return false;
    grad = grad || b.requires_grad();
  }
  return !(grad && at::GradMode::is_enabled());
}

bool int8_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                    const std::optional<at::Tensor>& bias) {
  if (!plain_contiguous(qweight, at::kChar) || qweight.dim() != 2) return false;
  const int64_t N = qweight.size(0), K = qweight.size(1);
  if (N == 0 || K == 0) return false;
  if (!plain_contiguous(scale, at::kFloat) || scale.dim() != 1 || scale.size(0) != N) return false;
  return activations_ok(x, K, N, bias);
}

// Group sizes: 32, or a multiple of 64 (the level-3 block).
bool int4_supported(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                    int64_t group, const std::optional<at::Tensor>& bias) {
  if (!plain_contiguous(packed, at::kByte) || packed.dim() != 2) return false;
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  if (N == 0 || K == 0 || !(group == 32 || (group > 0 && group % 64 == 0)) || K % group) return false;
  const int64_t G = K / group;
  for (const at::Tensor* t : {&scales, &mins})
    if (!plain_contiguous(*t, at::kFloat) || t->dim() != 2 || t->size(0) != N || t->size(1) != G) return false;
  return activations_ok(x, K, N, bias);
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kAvx2 && isa <= cpu_isa(), "qwen kernels: level ", isa, " is not available on this CPU (best ",
              cpu_isa(), ")");
}

// The output tensor [..., N] and the problem fields shared by both kernels.
at::Tensor setup(const at::Tensor& x, int64_t N, int64_t K, const std::optional<at::Tensor>& bias, at::Tensor& b,
                 QProblem& p) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  p.N = N;
  p.K = K;
  p.M = x.numel() / K;
  p.y = static_cast<c10::BFloat16*>(y.data_ptr());
  p.bias = nullptr;
  p.bias_kind = kNone;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    p.bias = b.data_ptr();
    p.bias_kind = kind_of(b);
  }
  return y;
}

// Per-thread buffers for the prepared activations (reused: a fresh allocation of a few hundred KB
// per call would cost page faults on every call).
thread_local std::vector<float> tl_xf;
thread_local std::vector<uint16_t> tl_xh;
thread_local std::vector<float> tl_sx;
thread_local std::vector<int8_t> tl_xq;
thread_local std::vector<float> tl_xd;
thread_local std::vector<int32_t> tl_lane;
thread_local std::vector<int16_t> tl_xi;

std::optional<at::Tensor> int8_gemv(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& bias, int64_t isa) {
  check_isa(isa);
  if (!int8_supported(x_in, qweight, scale, bias)) return std::nullopt;
  const at::Tensor x = x_in.contiguous();
  QProblem p{};
  at::Tensor b;
  at::Tensor y = setup(x, qweight.size(0), qweight.size(1), bias, b, p);
  p.w = static_cast<const uint8_t*>(qweight.data_ptr());
  p.row_bytes = p.K;
  p.scale = scale.data_ptr<float>();
#if QQ_X86
  const uint16_t* xb = static_cast<const uint16_t*>(x.data_ptr());
  if (isa == kAvx512Bf16) {
#if QQ_HAVE_BF16  // else cpu_isa() is at most kAvx512
    p.x = xb;  // the raw bf16 activations (masked loads for the tail)
    p.xs = p.K;
    run<I8Bf16>(p);
#endif
    return y;
  }
  if (isa == kAvx2) {
    p.g = I8Fixed16::kGroup;
    p.G = (p.K + p.g - 1) / p.g;
    prepare_fixed16(xb, p.M, p.K, p.g, false, tl_xi, tl_xd, &p.xs);
    p.x = tl_xi.data();
    p.xd = tl_xd.data();
    run<I8Fixed16>(p);
    return y;
  }
  prepare_x<float>(xb, p.M, p.K, 16, false, tl_xf, &p.xs);
  p.x = tl_xf.data();
  run<I8x512>(p);
#endif
  return y;
}

std::optional<at::Tensor> int4_gemv(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                                    const at::Tensor& mins, int64_t group, const std::optional<at::Tensor>& bias,
                                    int64_t isa, bool exact) {
  check_isa(isa);
  if (!int4_supported(x_in, packed, scales, mins, group, bias)) return std::nullopt;
  const at::Tensor x = x_in.contiguous();
  QProblem p{};
  at::Tensor b;
  at::Tensor y = setup(x, packed.size(0), packed.size(1) * 2, bias, b, p);
  p.w = static_cast<const uint8_t*>(packed.data_ptr());
  p.row_bytes = p.K / 2;
  p.scale = scales.data_ptr<float>();
  p.mins = mins.data_ptr<float>();
  p.g = group;
  p.G = p.K / group;
#if QQ_X86
  const uint16_t* xb = static_cast<const uint16_t*>(x.data_ptr());
  group_sums(xb, p.M, p.K, group, tl_sx);
  p.sx = tl_sx.data();
  if (!exact && (isa < kAvx512Bf16 || has_vnni())) {
    prepare_vnni(xb, p.M, p.K, group, tl_xq, tl_xd, tl_lane, &p.xs);
    p.x = tl_xq.data();
    p.xd = tl_xd.data();
    p.lane = tl_lane.data();
    if (isa == kAvx512Bf16)
      run<I4Vnni>(p);
    else
      run<I4Avx2Int8>(p);
  } else if (isa == kAvx512Bf16) {
#if QQ_HAVE_BF16  // else cpu_isa() is at most kAvx512
    prepare_x<uint16_t>(xb, p.M, p.K, 64, true, tl_xh, &p.xs);
    p.x = tl_xh.data();
    run<I4Bf16>(p);
#endif
  } else if (isa == kAvx512) {
    prepare_x<float>(xb, p.M, p.K, 32, true, tl_xf, &p.xs);
    p.x = tl_xf.data();
    run<I4x512>(p);
  } else {
    prepare_fixed16(xb, p.M, p.K, group, true, tl_xi, tl_xd, &p.xs);
    p.x = tl_xi.data();
    p.xd = tl_xd.data();
    run<I4Fixed16>(p);
  }
#endif
  return y;
}

bool int8_supports(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                   const std::optional<at::Tensor>& bias, int64_t isa) {
  check_isa(isa);
  return int8_supported(x, qweight, scale, bias);
}

bool int4_supports(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t group, const std::optional<at::Tensor>& bias, int64_t isa) {
  check_isa(isa);
  return int4_supported(x, packed, scales, mins, group, bias);
}

}  // namespace

namespace qwen_kernels {

std::optional<at::Tensor> int8_gemv_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& bias, int64_t isa) {
  return ::int8_gemv(x, qweight, scale, bias, isa);
}

std::optional<at::Tensor> int4_gemv_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                       const at::Tensor& mins, int64_t group, const std::optional<at::Tensor>& bias,
                                       int64_t isa, bool exact) {
  return ::int4_gemv(x, packed, scales, mins, group, bias, isa, exact);
}

void bind_quantized(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("int8_supports", &int8_supports, "whether int8_gemv takes these tensors", py::arg("x"), py::arg("qweight"),
        py::arg("scale"), py::arg("bias"), py::arg("isa"));
  m.def("int8_gemv", &int8_gemv, "y = x @ (qweight * scale[:, None]).T (+ bias), or None when not supported",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("int4_supports", &int4_supports, "whether int4_gemv takes these tensors", py::arg("x"), py::arg("packed"),
        py::arg("scales"), py::arg("mins"), py::arg("group_size"), py::arg("bias"), py::arg("isa"));
  m.def("int4_gemv", &int4_gemv, "y = x @ W~.T (+ bias) for int4 groups, or None when not supported", py::arg("x"),
        py::arg("packed"), py::arg("scales"), py::arg("mins"), py::arg("group_size"), py::arg("bias"),
        py::arg("isa"), py::arg("exact") = true, py::call_guard<py::gil_scoped_release>());
  m.def("has_vnni", &has_vnni, "whether the CPU has AVX512_VNNI (level 3 int4: the int8-activation kernel)");
}

}  // namespace qwen_kernels
