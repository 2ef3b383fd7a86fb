// Small-M matrix products on x86 CPUs: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), W and x in bf16 or
// fp16, sums in fp32, y rounded once (round to nearest even) to the activation dtype.
//
// For M = 1..16 such a product is a matrix-vector product: every weight is used M times at most, so
// the time is the time to stream W from memory. The kernels below read W once, in tiles of a few
// rows, apply each tile to all M activation rows while it is in L1/L2, and split the N rows over
// torch's intra-op threads (at::parallel_for, which honours torch.set_num_threads).
//
// One shared object holds every code path; each path's functions carry their own
// __attribute__((target(...))), so the file is compiled for the baseline x86-64 ISA (no -march) and
// the path is chosen at run time from CPUID (detect_isa) and the level the caller allows:
//   3 avx512_bf16: AVX-512F/BW/VL/DQ + AVX512_BF16; bf16 weights use VDPBF16PS on raw bf16 pairs.
//   2 avx512:      AVX-512F/BW/VL/DQ; bf16 -> fp32 by shifting (bf16 is the top half of an fp32),
//                  fp16 -> fp32 with VCVTPH2PS; then FMA.
//   1 avx2:        AVX2 + FMA + F16C, the same conversions on 256-bit vectors.
// fp16 weights take the level-2 kernel at level 3 (VDPBF16PS is for bf16 only).

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QK_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define QK_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define QK_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define QK_AVX2 __attribute__((target("avx2,fma,f16c")))
// Unroll the loops over tile rows completely and early, so that the accumulator arrays live in
// registers (GCC otherwise keeps them on the stack, storing after every product).
#if defined(__clang__)
#define QK_UNROLL _Pragma("unroll")
#else
#define QK_UNROLL _Pragma("GCC unroll 16")
#endif
// Compilers that know AVX512_BF16 (GCC 10, Clang 9); older ones build the other paths only.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define QK_HAVE_BF16 1
#else
#define QK_HAVE_BF16 0
#endif
#else
#define QK_X86 0
#define QK_UNROLL
#endif

namespace {


// Weight elements a task should cover at least before at::parallel_for hands work to a second
// thread (64 KiB of weights: waking a thread costs microseconds, so do not split tiny products).
constexpr int64_t kMinTaskElements = int64_t(1) << 15;

struct Problem {
  const uint16_t* w;  // [N, K] bf16 or fp16 bits, rows contiguous
  int64_t N, K;
  const void* x;  // [M, xs] activations in the layout the path reads (see prepare_x)
  int64_t xs;     // elements from one activation row to the next
  int64_t M;
  const void* bias;  // [N] or nullptr
  int bias_kind;
  void* y;  // [M, N]
  int out_kind;
};

// ----------------------------------------------------------------------------- CPU detection

#if QK_X86
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

// The best level this CPU (and its operating system, which must save the vector registers) offers.
int64_t detect_isa() {
#if QK_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return kTorch;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return kTorch;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return kTorch;  // XMM and YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return kTorch;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_subleaf = a;
  const bool avx2 = b & (1u << 5);
  if (!avx2) return kTorch;
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  if (!(f && dq && bw && vl) || (xcr0 & 0xe0) != 0xe0) return kAvx2;  // opmask, ZMM0-15, ZMM16-31 state
  if (max_subleaf < 1) return kAvx512;
  __cpuid_count(7, 1, a, b, c, d);
  return (a & (1u << 5)) ? kAvx512Bf16 : kAvx512;
#else
  return kTorch;
#endif
}

int64_t cpu_isa() {
#if QK_X86 && !QK_HAVE_BF16
  static const int64_t isa = std::min(detect_isa(), int64_t(kAvx512));
#else
  static const int64_t isa = detect_isa();
#endif
  return isa;
}

// ----------------------------------------------------------------------------- shared plumbing

inline float bias_at(const Problem& p, int64_t n) {
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

// out[i * NR + r] is the fp32 dot product of activation row m + i with weight row n + r.
template <int NR, int NM>
inline void store(const Problem& p, int64_t n, int64_t m, const float* out) {
  QK_UNROLL
  for (int r = 0; r < NR; ++r) {
    const float b = bias_at(p, n + r);
    QK_UNROLL
    for (int i = 0; i < NM; ++i) {
      const float v = out[i * NR + r] + b;
      const int64_t at = (m + i) * p.N + n + r;
      if (p.out_kind == kBF16)
        static_cast<c10::BFloat16*>(p.y)[at] = c10::BFloat16(v);
      else
        static_cast<c10::Half*>(p.y)[at] = c10::Half(v);
    }
  }
}

// Tile shapes (measured on Zen 4 with bench/kernels.py and variants of this file):
// - M = 1: on the AVX-512 paths one weight row at a time, so that each thread reads one sequential
//   stream, which DRAM serves best; 4 interleaved rows, or K unrolled into several accumulators,
//   read 5-15% slower there, and a software prefetch helps only rows longer than a page
//   (kPageBytes). The AVX2 paths need more independent accumulators: two per row (Chains) and 4 rows
//   (Path::kRows1, see kPageBytes).
// - M > 1: tiles of kRows weight rows x kM activation rows, so that each vector loaded feeds several
//   products (at M >= 4 the products take as long as the reads), and a prefetch into L2 of the
//   weights kPrefetchBytes ahead on the first pass over a tile (+7-30% at M = 4 and 8: without it
//   the reads wait behind the products). Later passes, for further activation rows, find the tile
//   in cache.
// Every output is the same fixed-order fp32 sum whatever the tile, M or thread count: the same
// accumulator vector(s) per output (two on the AVX2 paths, see Chains), fed one k-block after the
// other, their lanes summed at the end. So a row's result does not depend on the rows batched with it.
// At M = 1 the prefetch helps rows longer than a 4 KiB page (the hardware prefetcher stops at page
// boundaries): Qwen-1.8B's mlp.c_proj (K = 5504) read 1.16-1.2x faster with it on the FMA paths,
// while K = 2048 layers read 3-12% slower (Zen 4, interleaved). DpBf16 is not helped (0.92x). On an
// AVX2-only Zen 3 the AVX2 paths gain on every row, a page or not: the six layer shapes together
// 1.08-1.13x (fp16) and 1.13x (bf16), the lm_head 1.07-1.13x (interleaved, 9 rounds), so there they
// prefetch every row (Path::kPrefetchRowsOver: the row bytes above which M = 1 prefetches).
// There, the AVX2 paths also read 4 rows at a time at M = 1 (Path::kRows1; each output keeps its
// own two accumulators, so the same bits): the sequence of a Qwen-1.8B decode step's 121 products
// read at 39-41 GB/s instead of 29.5-30 (fp16 and bf16, 1.32-1.36x; Zen 3 in an hour where t.sum()
// read 33-40 GB/s, alternating, 7-9 rounds). One row at a time, each FMA chain waits for the one
// before it (two chains per row: 8 bytes a cycle in cache), which held a core below the memory
// rate; 4 rows give 8 independent chains.
constexpr int64_t kPrefetchBytes = 16384;
constexpr int64_t kPageBytes = 4096;

template <class Path, int NR, int NM>
inline void tile_store(const Problem& p, int64_t n, int64_t m, float* out) {
  if (m == 0)
    Path::template tile<NR, NM, true>(p, n, m, out);
  else
    Path::template tile<NR, NM, false>(p, n, m, out);
  store<NR, NM>(p, n, m, out);
}

// Rows n .. n+NR-1 of y for the activation rows m .. m+rest-1, rest < Path::kM: NM counts down to 1
// so that every remainder of M modulo Path::kM has its own fully unrolled tile.
template <class Path, int NR, int NM>
inline void tile_rest(const Problem& p, int64_t n, int64_t m, int64_t rest, float* out) {
  if constexpr (NM >= 1) {
    if (rest == NM)
      tile_store<Path, NR, NM>(p, n, m, out);
    else
      tile_rest<Path, NR, NM - 1>(p, n, m, rest, out);
  }
}

// Rows n .. n+NR-1 of y for every activation row.
template <class Path, int NR>
inline void row_block(const Problem& p, int64_t n, float* out) {
  int64_t m = 0;
  for (; m + Path::kM <= p.M; m += Path::kM) tile_store<Path, NR, Path::kM>(p, n, m, out);
  if (m < p.M) tile_rest<Path, NR, Path::kM - 1>(p, n, m, p.M - m, out);
}

template <class Path>
void run(const Problem& p) {
  if (p.M == 1) {
    constexpr int R1 = Path::kRows1;
    const int64_t groups = (p.N + R1 - 1) / R1;
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / (R1 * p.K));
    const bool prefetch = p.K * 2 > Path::kPrefetchRowsOver;
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      float out[R1];
      int64_t n = g0 * R1;
      const int64_t n1 = std::min(g1 * R1, p.N);
      for (; n + R1 <= n1; n += R1) {
        if (prefetch)
          Path::template tile<R1, 1, true>(p, n, 0, out);
        else
          Path::template tile<R1, 1, false>(p, n, 0, out);
        store<R1, 1>(p, n, 0, out);
      }
      for (; n < n1; ++n) {
        if (prefetch)
          Path::template tile<1, 1, true>(p, n, 0, out);
        else
          Path::template tile<1, 1, false>(p, n, 0, out);
        store<1, 1>(p, n, 0, out);
      }
    });
    return;
  }
  constexpr int R = Path::kRows;
  const int64_t groups = (p.N + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / (R * p.K));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    float out[R * Path::kM];
    int64_t n = g0 * R;
    const int64_t n1 = std::min(g1 * R, p.N);
    for (; n + R <= n1; n += R) row_block<Path, R>(p, n, out);
    for (; n < n1; ++n) row_block<Path, 1>(p, n, out);
  });
}

#if QK_X86
// The vector part of prepare_x's row (every kernel level has AVX2 + F16C): the k it did not do.
// A scalar loop took 20-60 us per call at K = 2048-5504 (Zen 3; fp16's conversions are software in a
// file built without -mf16c), ~3 ms of a Qwen-1.8B 16-bit decode step.
QK_AVX2 int64_t widen_row(const c10::BFloat16* src, int64_t K, int64_t block, bool pairs_split, float* dst) {
  if (!pairs_split || (block != 16 && block != 32)) return 0;
  const __m256i top = _mm256_set1_epi32(int32_t(0xffff0000u));
  int64_t k = 0;
  for (; k + block <= K; k += block)
    for (int64_t part = 0; part < block; part += 16) {  // 16 bf16 = 8 pairs: evens by shift, odds by mask
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k + part));
      _mm256_storeu_ps(dst + k + part / 2, _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)));
      _mm256_storeu_ps(dst + k + block / 2 + part / 2, _mm256_castsi256_ps(_mm256_and_si256(pairs, top)));
    }
  return k;
}
QK_AVX2 int64_t widen_row(const c10::Half* src, int64_t K, int64_t, bool pairs_split, float* dst) {
  if (pairs_split) return 0;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  return k;
}
#else
template <typename T>
int64_t widen_row(const T*, int64_t, int64_t, bool, float*) {
  return 0;
}
#endif

// The activations as fp32, each row padded with zeros to a multiple of `block` elements. With
// `pairs_split`, each block holds its even elements first and then its odd ones: the order in which
// the shift kernels unpack bf16 pairs (the low half of a 32-bit lane is the even element).
template <typename T>
std::vector<float> prepare_x(const T* x, int64_t M, int64_t K, int64_t block, bool pairs_split, int64_t* xs) {
  const int64_t padded = (K + block - 1) / block * block;
  std::vector<float> out(static_cast<size_t>(M * padded), 0.f);
  const int64_t half = block / 2;
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    float* dst = out.data() + m * padded;
    for (int64_t k = widen_row(src, K, block, pairs_split, dst); k < K; ++k) {
      int64_t at = k;
      if (pairs_split) {
        const int64_t base = k - k % block, j = k % block;
        at = base + (j & 1 ? half : 0) + j / 2;
      }
      dst[at] = static_cast<float>(src[k]);
    }
  }
  *xs = padded;
  return out;
}

#if QK_X86

// Each path below is a struct with
//   X: the activation element type it reads (raw bf16 bits, or fp32 prepared by prepare_x),
//   Vec, kStep: its accumulator vector and the weights per row one block consumes,
//   zero/reduce: a zero accumulator and the sum of its lanes,
//   block<NR, NM>(w, K, x, xs, k, acc): acc[i][r] += weights [k, k + kStep) of row r times those of
//       activation row i, for a full block,
//   tail<NR, NM>: the same for the last K - k < kStep weights, which it must not read past,
// and QK_TILE defines from them, with the path's target attribute, the tile<NR, NM, PF> function the
// driver calls: NR weight rows x NM activation rows over all of K.
#define QK_TILE(TARGET)                                                                                  \
  template <int NR, int NM, bool PF>                                                                     \
  TARGET static void tile(const Problem& p, int64_t n, int64_t m, float* out) {                          \
    const int64_t K = p.K;                                                                               \
    const uint16_t* w = p.w + n * K;                                                                     \
    const X* x = static_cast<const X*>(p.x) + m * p.xs;                                                  \
    Vec acc[NM][NR];                                                                                     \
    QK_UNROLL                                                                                            \
    for (int i = 0; i < NM; ++i)                                                                         \
      QK_UNROLL                                                                                          \
      for (int r = 0; r < NR; ++r) acc[i][r] = zero();                                                   \
    int64_t k = 0;                                                                                       \
    for (; k + kStep <= K; k += kStep) {                                                                 \
      if constexpr (PF) {                                                                                \
        QK_UNROLL                                                                                        \
        for (int r = 0; r < NR; ++r)                                                                     \
          _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchBytes, _MM_HINT_T1);      \
      }                                                                                                  \
      block<NR, NM>(w, K, x, p.xs, k, acc);                                                              \
    }                                                                                                    \
    if (k < K) tail<NR, NM>(w, K, x, p.xs, k, acc);                                                      \
    QK_UNROLL                                                                                            \
    for (int i = 0; i < NM; ++i)                                                                         \
      QK_UNROLL                                                                                          \
      for (int r = 0; r < NR; ++r) out[i * NR + r] = reduce(acc[i][r]);                                  \
  }

// ----------------------------------------------------------------------------- AVX-512 kernels

QK_AVX512 inline __mmask32 tail_mask32(int64_t count) {  // count in 1..31
  return static_cast<__mmask32>((uint32_t(1) << count) - 1);
}

#if QK_HAVE_BF16
// bf16 weights with AVX512_BF16: VDPBF16PS multiplies 16 bf16 pairs exactly and adds both products
// into fp32 lanes, so the raw bf16 activations are used as they are (no preparation). It treats
// subnormal inputs as zero and flushes subnormal sums (whatever MXCSR says): magnitudes below
// 1.2e-38, far from anything a model holds.
struct DpBf16 {
  using X = uint16_t;
  using Vec = __m512;
  static constexpr int kRows = 4, kM = 4, kRows1 = 1;
  static constexpr int64_t kPrefetchRowsOver = INT64_MAX;  // at M = 1: never (see kPageBytes)
  static constexpr int64_t kStep = 32;

  QK_AVX512BF16 static inline Vec zero() { return _mm512_setzero_ps(); }
  QK_AVX512BF16 static inline float reduce(Vec v) { return _mm512_reduce_add_ps(v); }

  template <int NR, int NM>
  QK_AVX512BF16 static inline void dot(const __m512i (&wv)[NR], const X* x, int64_t xs, int64_t k, __mmask32 mask,
                                       Vec (&acc)[NM][NR]) {
    QK_UNROLL
    for (int i = 0; i < NM; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * xs + k);
      QK_UNROLL
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }

  template <int NR, int NM>
  QK_AVX512BF16 static inline void block(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                         Vec (&acc)[NM][NR]) {
    __m512i wv[NR];
    QK_UNROLL
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * K + k);
    dot<NR, NM>(wv, x, xs, k, ~__mmask32(0), acc);
  }

  template <int NR, int NM>
  QK_AVX512BF16 static inline void tail(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                        Vec (&acc)[NM][NR]) {
    const __mmask32 mask = tail_mask32(K - k);
    __m512i wv[NR];
    QK_UNROLL
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
    dot<NR, NM>(wv, x, xs, k, mask, acc);
  }

  QK_TILE(QK_AVX512BF16)
};
#endif  // QK_HAVE_BF16

// bf16 weights on AVX-512 without BF16: a 512-bit load holds 32 bf16 = 16 pairs; shifting each
// 32-bit lane left by 16 gives the even elements as fp32, clearing its low half the odd ones.
// Activations: fp32, pairs split per block of 32, zero padded (prepare_x).
struct ShiftBf16x512 {
  using X = float;
  using Vec = __m512;
  static constexpr int kRows = 4, kM = 4, kRows1 = 1;
  static constexpr int64_t kPrefetchRowsOver = kPageBytes;  // at M = 1: rows over a page (see kPageBytes)
  static constexpr int64_t kStep = 32;

  QK_AVX512 static inline Vec zero() { return _mm512_setzero_ps(); }
  QK_AVX512 static inline float reduce(Vec v) { return _mm512_reduce_add_ps(v); }

  template <int NR, int NM>
  QK_AVX512 static inline void dot(const __m512i (&wv)[NR], const X* x, int64_t xs, int64_t k, Vec (&acc)[NM][NR]) {
    const __m512i high = _mm512_set1_epi32(int32_t(0xffff0000u));
    QK_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(wv[r], 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(wv[r], high));
      QK_UNROLL
      for (int i = 0; i < NM; ++i) {
        acc[i][r] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + i * xs + k), acc[i][r]);
        acc[i][r] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + i * xs + k + 16), acc[i][r]);
      }
    }
  }

  template <int NR, int NM>
  QK_AVX512 static inline void block(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                     Vec (&acc)[NM][NR]) {
    __m512i wv[NR];
    QK_UNROLL
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * K + k);
    dot<NR, NM>(wv, x, xs, k, acc);
  }

  template <int NR, int NM>
  QK_AVX512 static inline void tail(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                    Vec (&acc)[NM][NR]) {
    const __mmask32 mask = tail_mask32(K - k);
    __m512i wv[NR];
    QK_UNROLL
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
    dot<NR, NM>(wv, x, xs, k, acc);  // x is zero padded to the block
  }

  QK_TILE(QK_AVX512)
};

// fp16 weights on AVX-512: VCVTPH2PS widens 16 halves to fp32. Activations: fp32, zero padded to a
// multiple of 32.
struct CvtF16x512 {
  using X = float;
  using Vec = __m512;
  static constexpr int kRows = 4, kM = 4, kRows1 = 1;
  static constexpr int64_t kPrefetchRowsOver = kPageBytes;  // at M = 1: rows over a page (see kPageBytes)
  static constexpr int64_t kStep = 32;

  QK_AVX512 static inline Vec zero() { return _mm512_setzero_ps(); }
  QK_AVX512 static inline float reduce(Vec v) { return _mm512_reduce_add_ps(v); }

  template <int NR, int NM>
  QK_AVX512 static inline void dot(const __m256i (&lo)[NR], const __m256i (&hi)[NR], const X* x, int64_t xs, int64_t k,
                                   Vec (&acc)[NM][NR]) {
    QK_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512 first = _mm512_cvtph_ps(lo[r]);
      const __m512 second = _mm512_cvtph_ps(hi[r]);
      QK_UNROLL
      for (int i = 0; i < NM; ++i) {
        acc[i][r] = _mm512_fmadd_ps(first, _mm512_loadu_ps(x + i * xs + k), acc[i][r]);
        acc[i][r] = _mm512_fmadd_ps(second, _mm512_loadu_ps(x + i * xs + k + 16), acc[i][r]);
      }
    }
  }

  template <int NR, int NM>
  QK_AVX512 static inline void block(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                     Vec (&acc)[NM][NR]) {
    __m256i lo[NR], hi[NR];
    QK_UNROLL
    for (int r = 0; r < NR; ++r) {
      lo[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      hi[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k + 16));
    }
    dot<NR, NM>(lo, hi, x, xs, k, acc);
  }

  template <int NR, int NM>
  QK_AVX512 static inline void tail(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                    Vec (&acc)[NM][NR]) {
    const __mmask32 mask = tail_mask32(K - k);
    __m256i lo[NR], hi[NR];
    QK_UNROLL
    for (int r = 0; r < NR; ++r) {
      lo[r] = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask), w + r * K + k);
      hi[r] = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask >> 16), w + r * K + k + 16);
    }
    dot<NR, NM>(lo, hi, x, xs, k, acc);  // x is zero padded to the block
  }

  QK_TILE(QK_AVX512)
};

// ----------------------------------------------------------------------------- AVX2 kernels

QK_AVX2 inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// The AVX2 paths keep two accumulators per output, one for each of the two FMAs of a block (even
// and odd elements, or the block's two halves), summed at the end. With one, each FMA waited for the
// one before (4 cycles), which capped a thread at 16 weights per 8 cycles: Qwen-1.8B bf16 layers at
// M = 1 read 1.35-1.5x faster with two (fp16 1.1-1.3x; AVX2 caps on Zen 4, interleaved). The 16-lane
// AVX-512 paths gained nothing from it (fp16 0.9-1.03x) and keep one.
template <typename V>
struct Chains {
  V a, b;
};

// The last K - k < 16 weights of NR rows, zero padded to 16, so that the tail runs the vector body
// (AVX2 has no 16-bit masked loads).
template <int NR>
inline void copy_tail(const uint16_t* w, int64_t K, int64_t k, uint16_t (&tail)[NR][16]) {
  QK_UNROLL
  for (int r = 0; r < NR; ++r) {
    std::memset(tail[r], 0, sizeof(tail[r]));
    std::memcpy(tail[r], w + r * K + k, static_cast<size_t>(K - k) * sizeof(uint16_t));
  }
}

// bf16 weights on AVX2: a 256-bit load holds 16 bf16 = 8 pairs, unpacked by shift and mask as in
// ShiftBf16x512. Activations: fp32, pairs split per block of 16, zero padded.
struct ShiftBf16x256 {
  using X = float;
  using Vec = Chains<__m256>;
  static constexpr int kRows = 4, kM = 2, kRows1 = 4;  // kRows1: see kPageBytes
  static constexpr int64_t kPrefetchRowsOver = 0;  // at M = 1: every row (see kPageBytes)
  static constexpr int64_t kStep = 16;

  QK_AVX2 static inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  QK_AVX2 static inline float reduce(Vec v) { return hsum256(_mm256_add_ps(v.a, v.b)); }

  template <int NR, int NM>
  QK_AVX2 static inline void block(const uint16_t* w, int64_t row_stride, const X* x, int64_t xs, int64_t k,
                                   Vec (&acc)[NM][NR]) {
    const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
    QK_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_stride + k));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      QK_UNROLL
      for (int i = 0; i < NM; ++i) {
        acc[i][r].a = _mm256_fmadd_ps(even, _mm256_loadu_ps(x + i * xs + k), acc[i][r].a);
        acc[i][r].b = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + i * xs + k + 8), acc[i][r].b);
      }
    }
  }

  template <int NR, int NM>
  QK_AVX2 static inline void tail(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                  Vec (&acc)[NM][NR]) {
    uint16_t padded[NR][16];
    copy_tail<NR>(w, K, k, padded);
    block<NR, NM>(&padded[0][0], 16, x + k, xs, 0, acc);  // x is zero padded to the block
  }

  QK_TILE(QK_AVX2)
};

// fp16 weights on AVX2 + F16C: VCVTPH2PS widens 8 halves at a time. Activations: fp32, zero padded
// to a multiple of 16.
struct CvtF16x256 {
  using X = float;
  using Vec = Chains<__m256>;
  static constexpr int kRows = 4, kM = 2, kRows1 = 4;  // kRows1: see kPageBytes
  static constexpr int64_t kPrefetchRowsOver = 0;  // at M = 1: every row (see kPageBytes)
  static constexpr int64_t kStep = 16;

  QK_AVX2 static inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  QK_AVX2 static inline float reduce(Vec v) { return hsum256(_mm256_add_ps(v.a, v.b)); }

  template <int NR, int NM>
  QK_AVX2 static inline void block(const uint16_t* w, int64_t row_stride, const X* x, int64_t xs, int64_t k,
                                   Vec (&acc)[NM][NR]) {
    QK_UNROLL
    for (int r = 0; r < NR; ++r) {
      const uint16_t* row = w + r * row_stride + k;
      const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8)));
      QK_UNROLL
      for (int i = 0; i < NM; ++i) {
        acc[i][r].a = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + i * xs + k), acc[i][r].a);
        acc[i][r].b = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + i * xs + k + 8), acc[i][r].b);
      }
    }
  }

  template <int NR, int NM>
  QK_AVX2 static inline void tail(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t k,
                                  Vec (&acc)[NM][NR]) {
    uint16_t padded[NR][16];
    copy_tail<NR>(w, K, k, padded);
    block<NR, NM>(&padded[0][0], 16, x + k, xs, 0, acc);  // x is zero padded to the block
  }

  QK_TILE(QK_AVX2)
};

#endif  // QK_X86

// ----------------------------------------------------------------------------- entry points

// Whether gemv takes these: x [..., K] and w [N, K] (contiguous) of one dtype, bf16 or fp16, on
// the CPU, 1..kMaxRows rows, bias absent or [N] fp32/bf16/fp16, and no autograd graph to record.
// Non-contiguous x and bias are fine (copied: M * K and N elements).
bool supported(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (!plain_cpu(x) || !plain_cpu(w) || w.dim() != 2 || x.dim() < 1) return false;
  const int kind = kind_of(w);
  if ((kind != kBF16 && kind != kF16) || x.scalar_type() != w.scalar_type()) return false;
  const int64_t N = w.size(0), K = w.size(1);
  if (N == 0 || K == 0 || x.size(-1) != K || !w.is_contiguous()) return false;
  const int64_t M = x.numel() / K;
  if (M < 1 || M > kMaxRows) return false;
  bool grad = x.requires_grad() || w.requires_grad();
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    if (!plain_cpu(b) || b.dim() != 1 || b.size(0) != N || kind_of(b) == kNone) return false;
    grad = grad || b.requires_grad();
  }
  return !(grad && at::GradMode::is_enabled());
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kAvx2 && isa <= cpu_isa(), "qwen kernels: level ", isa, " is not available on this CPU (best ",
              cpu_isa(), ")");
}

bool supports(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t isa) {
  check_isa(isa);
  return supported(x, w, bias);
}

// y = x @ w.T (+ bias) with the kernels of level `isa` (1..3, at most what the CPU offers), shaped
// [..., N] like x and in x's dtype; std::nullopt when `supported` says no (the caller then uses
// torch).
std::optional<at::Tensor> gemv(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               int64_t isa) {
  check_isa(isa);
  if (!supported(x_in, w, bias)) return std::nullopt;
  const at::Tensor x = x_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());

  Problem p{};
  p.w = static_cast<const uint16_t*>(w.data_ptr());
  p.N = N;
  p.K = K;
  p.M = M;
  p.y = y.data_ptr();
  p.out_kind = kind_of(x);
  p.bias = nullptr;
  p.bias_kind = kNone;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    p.bias = b.data_ptr();
    p.bias_kind = kind_of(b);
  }

#if QK_X86
  const bool bf16 = p.out_kind == kBF16;
  std::vector<float> prepared;
  if (bf16 && isa == kAvx512Bf16) {
#if QK_HAVE_BF16  // else cpu_isa() is at most kAvx512
    p.x = x.data_ptr();
    p.xs = K;
    run<DpBf16>(p);
#endif
  } else if (bf16) {
    const int64_t block = isa >= kAvx512 ? 32 : 16;
    prepared = prepare_x(static_cast<const c10::BFloat16*>(x.data_ptr()), M, K, block, true, &p.xs);
    p.x = prepared.data();
    if (isa >= kAvx512)
      run<ShiftBf16x512>(p);
    else
      run<ShiftBf16x256>(p);
  } else {
    prepared = prepare_x(static_cast<const c10::Half*>(x.data_ptr()), M, K, isa >= kAvx512 ? 32 : 16, false, &p.xs);
    p.x = prepared.data();
    if (isa >= kAvx512)
      run<CvtF16x512>(p);
    else
      run<CvtF16x256>(p);
  }
#endif
  return y;
}

}  // namespace

// cpu_qgemv.cpp (the int8/int4 kernels, same extension) shares the CPU detection and adds its
// functions to this module.
namespace qwen_kernels {
int64_t cpu_isa() { return ::cpu_isa(); }
std::optional<at::Tensor> gemv_op(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  int64_t isa) {
  return ::gemv(x, w, bias, isa);
}
void bind_quantized(pybind11::module_& m);  // cpu_qgemv.cpp
void bind_ops(pybind11::module_& m);        // cpu_ops.cpp
void bind_gemm(pybind11::module_& m);       // cpu_gemm.cpp
void bind_decode(pybind11::module_& m);     // cpu_decode.cpp
}  // namespace qwen_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "qwen small-M matrix products for x86 CPUs: bf16/fp16 weights, int8/int4 weight-only quantized";
  m.attr("max_rows") = kMaxRows;
  m.def("cpu_isa", &cpu_isa, "best kernel level this CPU offers: 0 none, 1 avx2, 2 avx512, 3 avx512_bf16");
  m.def("supports", &supports, "whether gemv takes these tensors", py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("isa"));
  m.def("gemv", &gemv, "y = x @ w.T (+ bias) for small M, or None when not supported", py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());
  qwen_kernels::bind_quantized(m);
  qwen_kernels::bind_ops(m);
  qwen_kernels::bind_gemm(m);
  qwen_kernels::bind_decode(m);
}
