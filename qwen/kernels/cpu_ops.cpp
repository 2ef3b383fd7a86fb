// The small operations of a decode step on x86 CPUs, each one call instead of the handful of torch
// ops (and their per-op overhead) the model would otherwise run per layer:
//
//   attention(q, k, v, bias, causal, scale): softmax(q k^T * scale + bias) v for a few new queries
//     (1..16 per row) over the cached keys. torch's scaled_dot_product_attention takes 0.14 ms for
//     80 cached tokens and 1 ms for 600 on one head-batch of Qwen-1.8B (2 threads), many times the
//     time to read the keys and values. Here: dot products, softmax and the weighted sum of values
//     all in fp32 (keys/values widened exactly), one rounding of the output to the model's dtype.
//   rms_norm(x, weight, eps): QWenRMSNorm (normalise in fp32, round to x's dtype, multiply by the
//     weight in x's dtype), one rounding where torch rounds; only the mean's summation order differs.
//   rotary_qk(qkv, cos, sin, heads): q and k of c_attn's output, rotated as apply_rotary does (fp32,
//     the same multiplies and add, rounded as torch rounds them: bit for bit equal), laid out
//     [B, heads, T, head_dim].
//
// Vector code for AVX-512 (16 lanes) and AVX2 (8 lanes) with per-function target attributes, as in
// cpu_gemv.cpp; rms_norm and rotary_qk are plain C++ (no FMA contraction without -march: the
// products and sums round as torch's).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QO_X86 1
#include <immintrin.h>
#define QO_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define QO_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QO_F16C __attribute__((target("avx,f16c")))  // conversions only: no FMA to contract into
#else
#define QO_X86 0
#endif

namespace qwen_kernels {
int64_t cpu_isa();
void bind_ops(pybind11::module_& m);
}  // namespace qwen_kernels

namespace {

using qwen_kernels::cpu_isa;


constexpr int64_t kMaxQueries = 16;  // new tokens per row that attention takes
constexpr int64_t kMaxHeadDim = 512;

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

inline float scalar_at(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF32:
      return static_cast<const float*>(p)[i];
    case kBF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case kF16:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default:
      return 0.f;
  }
}

// ----------------------------------------------------------------------------- attention

struct Attn {
  const void* q;  // [B, H, T, d], element strides below, last dim contiguous
  int64_t qb, qh, qt;
  const void* k;  // [B, H, L, d]
  int64_t kb, kh, kl;
  const void* v;
  int64_t vb, vh, vl;
  const void* bias;  // [B|1, H|1, T, L] additive, or nullptr; broadcast dims have stride 0
  int bias_kind;
  int64_t bb, bh, bt;
  bool causal;  // query t sees keys 0 .. L - T + t
  int64_t B, H, T, L, d;
  float scale;
  void* out;  // [B, T, H, d] contiguous, q's dtype
};

// Per-thread scratch: q rows in fp32, scores, output sums.
thread_local std::vector<float> tl_q, tl_s, tl_o;

// The body of one (batch row, head) task, written once for both vector widths: V supplies the
// vector type and its operations (with its target attribute); TARGET is that same attribute.
#define QO_ATTEND(TARGET)                                                                                 \
  template <typename E>                                                                                  \
  TARGET static void head(const Attn& a, int64_t b, int64_t h, float* qf, float* s, float* o) {          \
    const int64_t d = a.d, L = a.L, T = a.T, nv = (d + W - 1) / W, dp = nv * W;                          \
    const E* q = static_cast<const E*>(a.q) + b * a.qb + h * a.qh;                                       \
    const E* k = static_cast<const E*>(a.k) + b * a.kb + h * a.kh;                                       \
    const E* v = static_cast<const E*>(a.v) + b * a.vb + h * a.vh;                                       \
    for (int64_t t = 0; t < T; ++t)                                                                      \
      for (int64_t j = 0; j < nv; ++j) store(qf + t * dp + j * W, load(q + t * a.qt + j * W, lanes(d, j)));    \
    /* scores: s[t, l] = (q_t . k_l) * scale + bias; keys past a causal query's limit are skipped */     \
    for (int64_t l = 0; l < L; ++l) {                                                                    \
      const E* kr = k + l * a.kl;                                                                        \
      for (int64_t t = 0; t < T; ++t) {                                                                  \
        if (a.causal && l > L - T + t) continue;                                                         \
        Vec acc = zero();                                                                                \
        for (int64_t j = 0; j < nv; ++j) acc = fma(load(qf + t * dp + j * W), load(kr + j * W, lanes(d, j)), acc); \
        float x = reduce_add(acc) * a.scale;                                                             \
        if (a.bias) x += scalar_at(a.bias, a.bias_kind, b * a.bb + h * a.bh + t * a.bt + l);             \
        s[t * L + l] = x;                                                                                \
      }                                                                                                  \
    }                                                                                                    \
    /* softmax numerators in place, and each row's sum */                                               \
    float inv[kMaxQueries];                                                                              \
    for (int64_t t = 0; t < T; ++t) {                                                                    \
      float* row = s + t * L;                                                                            \
      const int64_t n = a.causal ? L - T + t + 1 : L;                                                    \
      float m = row[0];                                                                                  \
      for (int64_t l = 1; l < n; ++l) m = std::max(m, row[l]);                                           \
      const Vec mv = set1(m);                                                                            \
      Vec sum = zero();                                                                                  \
      int64_t l = 0;                                                                                     \
      for (; l + W <= n; l += W) {                                                                       \
        const Vec e = exp(sub(load(row + l), mv));                                                       \
        store(row + l, e);                                                                               \
        sum = add(sum, e);                                                                               \
      }                                                                                                  \
      float total = reduce_add(sum);                                                                     \
      if (l < n) {                                                                                       \
        alignas(64) float tail[W] = {0};                                                                 \
        std::memcpy(tail, row + l, sizeof(float) * (n - l));                                             \
        store(tail, exp(sub(load(tail), mv)));                                                           \
        for (int64_t i = 0; i < n - l; ++i) total += tail[i];                                            \
        std::memcpy(row + l, tail, sizeof(float) * (n - l));                                             \
      }                                                                                                  \
      for (int64_t i = n; i < L; ++i) row[i] = 0.f;                                                      \
      inv[t] = 1.f / total;                                                                              \
    }                                                                                                    \
    /* o_t = sum_l e[t, l] v_l, then scaled by 1 / sum */                                              \
    std::fill(o, o + T * dp, 0.f);                                                                       \
    for (int64_t l = 0; l < L; ++l) {                                                                    \
      const E* vr = v + l * a.vl;                                                                        \
      for (int64_t j = 0; j < nv; ++j) {                                                                 \
        const Vec x = load(vr + j * W, lanes(d, j));                                                     \
        for (int64_t t = 0; t < T; ++t) {                                                                \
          float* acc = o + t * dp + j * W;                                                               \
          store(acc, fma(set1(s[t * L + l]), x, load(acc)));                                             \
        }                                                                                                \
      }                                                                                                  \
    }                                                                                                    \
    E* out = static_cast<E*>(a.out);                                                                     \
    for (int64_t t = 0; t < T; ++t) {                                                                    \
      E* dst = out + ((b * T + t) * a.H + h) * d;                                                        \
      for (int64_t i = 0; i < d; ++i) dst[i] = E(o[t * dp + i] * inv[t]);                                \
    }                                                                                                    \
  }

#if QO_X86
// exp(x) for x <= 0 (softmax numerators): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by the Cephes
// polynomial (relative error ~2e-7), times 2^n. Below -87 the result is 0 (exp there < 2e-38).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

struct V512 {
  using Vec = __m512;
  static constexpr int64_t W = 16;
  QO_AVX512 static inline int lanes(int64_t d, int64_t j) { return int(std::min<int64_t>(W, d - j * W)); }
  QO_AVX512 static inline __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1); }
  QO_AVX512 static inline Vec zero() { return _mm512_setzero_ps(); }
  QO_AVX512 static inline Vec set1(float x) { return _mm512_set1_ps(x); }
  QO_AVX512 static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  QO_AVX512 static inline void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
  QO_AVX512 static inline Vec load(const float* p, int n) {
    return n == W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(n), p);
  }
  QO_AVX512 static inline __m256i halves(const void* p, int n) {
    return n == W ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(mask(n), p);
  }
  QO_AVX512 static inline Vec load(const c10::BFloat16* p, int n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves(p, n)), 16));
  }
  QO_AVX512 static inline Vec load(const c10::Half* p, int n) { return _mm512_cvtph_ps(halves(p, n)); }
  QO_AVX512 static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  QO_AVX512 static inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  QO_AVX512 static inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  QO_AVX512 static inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a); }
  QO_AVX512 static inline Vec exp(Vec x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const Vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
    Vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    Vec p = _mm512_set1_ps(kP0);
    for (float c : {kP1, kP2, kP3, kP4, kP5}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
  }
  QO_ATTEND(QO_AVX512)
};

struct V256 {
  using Vec = __m256;
  static constexpr int64_t W = 8;
  QO_AVX2 static inline int lanes(int64_t d, int64_t j) { return int(std::min<int64_t>(W, d - j * W)); }
  QO_AVX2 static inline Vec zero() { return _mm256_setzero_ps(); }
  QO_AVX2 static inline Vec set1(float x) { return _mm256_set1_ps(x); }
  QO_AVX2 static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  QO_AVX2 static inline void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
  template <typename E>
  static inline const E* padded(const E* p, int n, E (&tmp)[8]) {  // the last n < 8 elements, zero padded
    std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
    std::memcpy(static_cast<void*>(tmp), p, sizeof(E) * n);
    return tmp;
  }
  QO_AVX2 static inline Vec load(const float* p, int n) {
    float tmp[8];
    return _mm256_loadu_ps(n == W ? p : padded(p, n, tmp));
  }
  QO_AVX2 static inline Vec load(const c10::BFloat16* p, int n) {
    c10::BFloat16 tmp[8];
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(n == W ? p : padded(p, n, tmp)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  QO_AVX2 static inline Vec load(const c10::Half* p, int n) {
    c10::Half tmp[8];
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(n == W ? p : padded(p, n, tmp))));
  }
  QO_AVX2 static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  QO_AVX2 static inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  QO_AVX2 static inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  QO_AVX2 static inline float reduce_add(Vec v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  QO_AVX2 static inline Vec exp(Vec x) {
    const Vec tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const Vec n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Vec r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    Vec p = _mm256_set1_ps(kP0);
    for (float c : {kP1, kP2, kP3, kP4, kP5}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    // 2^n for n >= -126 (x >= -87): the exponent field directly.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
  QO_ATTEND(QO_AVX2)
};
#endif  // QO_X86

template <class V, typename E>
void attend_all(const Attn& a) {
  const int64_t dp = (a.d + V::W - 1) / V::W * V::W;
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t i0, int64_t i1) {
    tl_q.resize(static_cast<size_t>(a.T * dp));
    tl_o.resize(static_cast<size_t>(a.T * dp));
    tl_s.resize(static_cast<size_t>(a.T * a.L));
    for (int64_t i = i0; i < i1; ++i) V::template head<E>(a, i / a.H, i % a.H, tl_q.data(), tl_s.data(), tl_o.data());
  });
}

// Which tensors attention takes: q [B, H, T, d] with T <= 16, k and v [B, H, L, d] (any strides but
// a contiguous last dim), all of one float dtype; bias absent or [B|1, H|1, T, L] (any float dtype,
// contiguous last dim). With causal (and no bias), T <= L.
bool attention_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& bias, bool causal) {
  for (const at::Tensor* t : {&q, &k, &v})
    if (!plain_cpu(*t) || t->dim() != 4 || t->stride(3) != 1 || kind_of(*t) == kNone ||
        t->scalar_type() != q.scalar_type())
      return false;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), L = k.size(2);
  if (B < 1 || H < 1 || T < 1 || T > kMaxQueries || d < 1 || d > kMaxHeadDim || L < 1) return false;
  if (k.size(0) != B || k.size(1) != H || k.size(3) != d || !v.sizes().equals(k.sizes())) return false;
  if (causal && T > L) return false;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& m = *bias;
    if (!plain_cpu(m) || m.dim() != 4 || kind_of(m) == kNone || m.stride(3) != 1) return false;
    if ((m.size(0) != B && m.size(0) != 1) || (m.size(1) != H && m.size(1) != 1) || m.size(2) != T ||
        m.size(3) != L)
      return false;
  }
  return true;
}

std::optional<at::Tensor> attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& bias, bool causal, double scale, int64_t isa) {
  TORCH_CHECK(isa >= kAvx2 && isa <= cpu_isa(), "qwen kernels: level ", isa, " is not available on this CPU");
  if (!attention_supported(q, k, v, bias, causal)) return std::nullopt;
  Attn a{};
  a.B = q.size(0), a.H = q.size(1), a.T = q.size(2), a.d = q.size(3), a.L = k.size(2);
  a.q = q.data_ptr(), a.qb = q.stride(0), a.qh = q.stride(1), a.qt = q.stride(2);
  a.k = k.data_ptr(), a.kb = k.stride(0), a.kh = k.stride(1), a.kl = k.stride(2);
  a.v = v.data_ptr(), a.vb = v.stride(0), a.vh = v.stride(1), a.vl = v.stride(2);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& m = *bias;
    a.bias = m.data_ptr();
    a.bias_kind = kind_of(m);
    a.bb = m.size(0) == 1 ? 0 : m.stride(0);
    a.bh = m.size(1) == 1 ? 0 : m.stride(1);
    a.bt = m.stride(2);
  }
  a.causal = causal && !a.bias;
  a.scale = static_cast<float>(scale);
  at::Tensor out = at::empty({a.B, a.T, a.H * a.d}, q.options());
  a.out = out.data_ptr();
#if QO_X86
  const Kind kind = kind_of(q);
  if (isa >= kAvx512) {
    if (kind == kF32) attend_all<V512, float>(a);
    else if (kind == kBF16) attend_all<V512, c10::BFloat16>(a);
    else attend_all<V512, c10::Half>(a);
  } else {
    if (kind == kF32) attend_all<V256, float>(a);
    else if (kind == kBF16) attend_all<V256, c10::BFloat16>(a);
    else attend_all<V256, c10::Half>(a);
  }
#endif
  return out;
}

// ----------------------------------------------------------------------------- whole rows to and from fp32

// c10::Half's own conversions are software in this file (built without -mf16c): RMSNorm of
// 512 x 2048 fp16 took 6.5 ms that way, 10x its bf16 time, and a decode step's fp16 RMSNorm and
// rotary 25 us each. F16C converts 8 at a time with the same results (fp16 -> fp32 is exact,
// fp32 -> fp16 rounds to nearest even as c10 does); the kernel levels all require it, and where
// the CPU lacks it (no level) the scalar loop runs. The arithmetic stays in the plain functions
// below (no FMA contraction: the products and sums round as torch's).
template <typename E>
void widen_row(const E* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename E>
void narrow_row(const float* src, E* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = E(src[i]);
}
#if QO_X86
QO_F16C void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}
QO_F16C void narrow_f16c(const float* src, c10::Half* dst, int64_t n) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kNearest));
  for (; i < n; ++i) dst[i].x = _cvtss_sh(src[i], kNearest);
}
template <>
void widen_row(const c10::Half* src, float* dst, int64_t n) {
  if (cpu_isa() < kAvx2) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
    return;
  }
  widen_f16c(src, dst, n);
}
template <>
void narrow_row(const float* src, c10::Half* dst, int64_t n) {
  if (cpu_isa() < kAvx2) {
    for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
    return;
  }
  narrow_f16c(src, dst, n);
}
#endif

// ----------------------------------------------------------------------------- RMSNorm

// y = E(E(x * (1 / sqrt(mean(x^2) + eps))) * w) per row, as QWenRMSNorm computes it for E = bf16 /
// fp16 (for fp32 the inner rounding is the identity).
template <typename E>
void rms_rows(const E* x, const E* w, E* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / D), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(3 * D);
    float *xf = scratch.data(), *wf = xf + D, *t = wf + D;
    std::vector<E> rounded(D);
    widen_row(w, wf, D);
    for (int64_t r = r0; r < r1; ++r) {
      widen_row(x + r * D, xf, D);
      float part[16] = {0};  // 16 running sums: the compiler vectorizes them
      int64_t i = 0;
      for (; i + 16 <= D; i += 16)
        for (int j = 0; j < 16; ++j) part[j] += xf[i + j] * xf[i + j];
      float total = 0.f;
      for (; i < D; ++i) total += xf[i] * xf[i];
      for (float p : part) total += p;
      const float inv = 1.f / std::sqrt(total / static_cast<float>(D) + eps);
      for (int64_t j = 0; j < D; ++j) t[j] = xf[j] * inv;
      narrow_row(t, rounded.data(), D);  // the inner rounding to E
      widen_row(rounded.data(), t, D);
      for (int64_t j = 0; j < D; ++j) t[j] *= wf[j];
      narrow_row(t, y + r * D, D);
    }
  });
}

std::optional<at::Tensor> rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  if (!plain_cpu(x_in) || !plain_cpu(w) || kind_of(x_in) == kNone || w.scalar_type() != x_in.scalar_type() ||
      w.dim() != 1 || x_in.dim() < 1 || x_in.size(-1) != w.size(0) || !w.is_contiguous() || w.numel() == 0)
    return std::nullopt;
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t D = w.size(0), rows = x.numel() / D;
  const float e = static_cast<float>(eps);
  switch (kind_of(x)) {
    case kF32:
      rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, e);
      break;
    case kBF16:
      rms_rows(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, D, e);
      break;
    default:
      rms_rows(x.data_ptr<c10::Half>(), w.data_ptr<c10::Half>(), y.data_ptr<c10::Half>(), rows, D, e);
  }
  return y;
}

// ----------------------------------------------------------------------------- rotary

// out[b, h, t, i] for i < rot: E(x_i * cos_i + r_i * sin_i) with r = (-x[half:], x[:half]), each
// product and the sum rounded to fp32 as torch's three ops round them; i >= rot: x_i.
template <typename E>
void rotate(const E* src, int64_t src_t, const float* cos, const float* sin, int64_t cos_b, int64_t B, int64_t T,
            int64_t H, int64_t d, int64_t rot, E* dst) {
  const int64_t half = rot / 2;
  at::parallel_for(0, B * H, std::max<int64_t>(1, 4096 / (T * d)), [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(2 * d);
    float *x = scratch.data(), *y = x + d;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      for (int64_t t = 0; t < T; ++t) {
        widen_row(src + (b * T + t) * src_t + h * d, x, d);
        const float* c = cos + b * cos_b + t * rot;
        const float* s = sin + b * cos_b + t * rot;
        for (int64_t j = 0; j < rot; ++j) {
          const float r = j < half ? -x[j + half] : x[j - half];
          const float a = x[j] * c[j];
          const float bsum = r * s[j];
          y[j] = a + bsum;
        }
        for (int64_t j = rot; j < d; ++j) y[j] = x[j];  // exact: x came from E
        narrow_row(y, dst + ((b * H + h) * T + t) * d, d);
      }
    }
  });
}

// qkv [B, T, >= 2 * H * d] (c_attn's output; the last dim contiguous), cos/sin fp32 [B|1, 1, T, rot]
// contiguous: (q, k) rotated, each [B, H, T, d] contiguous in qkv's dtype.
std::optional<std::tuple<at::Tensor, at::Tensor>> rotary_qk(const at::Tensor& qkv, const at::Tensor& cos,
                                                            const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  if (!plain_cpu(qkv) || kind_of(qkv) == kNone || qkv.dim() != 3 || qkv.stride(2) != 1 || heads < 1 ||
      head_dim < 2 || qkv.size(2) < 2 * heads * head_dim || qkv.stride(0) != qkv.size(1) * qkv.stride(1))
    return std::nullopt;
  const int64_t B = qkv.size(0), T = qkv.size(1);
  for (const at::Tensor* t : {&cos, &sin})
    if (!plain_cpu(*t) || t->scalar_type() != at::kFloat || !t->is_contiguous() || t->dim() != 4 ||
        (t->size(0) != B && t->size(0) != 1) || t->size(1) != 1 || t->size(2) != T || !t->sizes().equals(cos.sizes()))
      return std::nullopt;
  const int64_t rot = cos.size(3);
  if (rot < 2 || rot % 2 || rot > head_dim) return std::nullopt;
  const int64_t cos_b = cos.size(0) == 1 ? 0 : T * rot, span = heads * head_dim, src_t = qkv.stride(1);
  at::Tensor q = at::empty({B, heads, T, head_dim}, qkv.options());
  at::Tensor k = at::empty({B, heads, T, head_dim}, qkv.options());
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  auto both = [&](auto* base) {
    using E = std::remove_pointer_t<decltype(base)>;
    rotate<E>(base, src_t, c, s, cos_b, B, T, heads, head_dim, rot, q.data_ptr<E>());
    rotate<E>(base + span, src_t, c, s, cos_b, B, T, heads, head_dim, rot, k.data_ptr<E>());
  };
  switch (kind_of(qkv)) {
    case kF32:
      both(qkv.data_ptr<float>());
      break;
    case kBF16:
      both(qkv.data_ptr<c10::BFloat16>());
      break;
    default:
      both(qkv.data_ptr<c10::Half>());
  }
  return std::make_tuple(q, k);
}

}  // namespace

namespace qwen_kernels {

std::optional<at::Tensor> attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& bias, bool causal, double scale, int64_t isa) {
  return ::attention(q, k, v, bias, causal, scale, isa);
}

std::optional<at::Tensor> rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return ::rms_norm(x, weight, eps);
}

std::optional<std::tuple<at::Tensor, at::Tensor>> rotary_qk_op(const at::Tensor& qkv, const at::Tensor& cos,
                                                               const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  return ::rotary_qk(qkv, cos, sin, heads, head_dim);
}

void bind_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("max_queries") = kMaxQueries;
  m.def("attention", &attention,
        "softmax(q k^T * scale + bias) v for a few queries, [B, T, H * d]; None when not supported", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("causal"), py::arg("scale"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "QWenRMSNorm; None when not supported", py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("rotary_qk", &rotary_qk, "(q, k) of c_attn's output, rotated; None when not supported", py::arg("qkv"),
        py::arg("cos"), py::arg("sin"), py::arg("heads"), py::arg("head_dim"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace qwen_kernels
