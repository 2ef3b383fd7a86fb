// The two products of attention over Qwen's int8 KV cache (`use_cache_quantization`), on CUDA.
//
// This file is also written into saved checkpoints as remote code, beside cache_kernels.py, which
// builds it on first use (torch.utils.cpp_extension) together with cache_kernels.cpp.
//
// The cache holds, per (batch, head) row `bn`, uint8 keys/values q[bn, k, 0..d) and one (scale,
// zero) pair per cached token k: x = scale * (q - zero). Both kernels read the uint8 values once,
// dequantize on the fly and sum in float32, in a fixed order (no atomics: the same inputs give the
// same bits on every run, unlike the original's fp16 atomicAdd tiles).
//
//   qk: scores[bn, t, c] = sum_k query[bn, t, k] * scale[bn, c] * (key_q[bn, c, k] - zero[bn, c])
//                        = scale[bn, c] * (dot(query_t, key_q_c) - zero[bn, c] * sum(query_t))
//   pv: out[bn, t, c]    = sum_k probs[bn, t, k] * scale[bn, k] * (value_q[bn, k, c] - zero[bn, k])
//
// Shapes: query [BN, T, d], key_q / value_q [BN, K, d] (the cache's own layout, no transposed copy),
// scale / zero [BN, K], probs [BN, T, K], outputs [BN, T, K] and [BN, T, d]; all contiguous.
// T is the number of new positions (1 when decoding), K the cached tokens, d the head size.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qwen_cache {

constexpr int kThreads = 128;

template <typename T> __device__ __forceinline__ float load(const T* p) { return static_cast<float>(*p); }
template <> __device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T> __device__ __forceinline__ T store(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One block per (row bn, query position t, 128 cached tokens c): the query row sits in shared memory;
// each thread walks one key's d bytes (4 at a time when d allows).
template <typename T>
__global__ void qk_kernel(const T* __restrict__ query, const uint8_t* __restrict__ key_q,
                          const T* __restrict__ scale, const T* __restrict__ zero, T* __restrict__ scores,
                          int positions, int tokens, int head_dim) {
  extern __shared__ float shared[];  // head_dim query values, then one slot for their sum
  const int bn = blockIdx.z, t = blockIdx.y;
  const int c = blockIdx.x * kThreads + threadIdx.x;
  const T* q = query + (static_cast<int64_t>(bn) * positions + t) * head_dim;
  for (int k = threadIdx.x; k < head_dim; k += kThreads) shared[k] = load(q + k);
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int k = 0; k < head_dim; ++k) sum += shared[k];
    shared[head_dim] = sum;
  }
  __syncthreads();
  if (c >= tokens) return;
  const uint8_t* key = key_q + (static_cast<int64_t>(bn) * tokens + c) * head_dim;
  float dot = 0.f;
  int k = 0;
  if ((head_dim & 3) == 0) {
    const uchar4* key4 = reinterpret_cast<const uchar4*>(key);
    for (; k < head_dim; k += 4) {
      const uchar4 v = key4[k >> 2];
      dot += shared[k] * v.x + shared[k + 1] * v.y + shared[k + 2] * v.z + shared[k + 3] * v.w;
    }
  }
  for (; k < head_dim; ++k) dot += shared[k] * key[k];
  const int64_t at = static_cast<int64_t>(bn) * tokens + c;
  const float s = load(scale + at), z = load(zero + at);
  scores[(static_cast<int64_t>(bn) * positions + t) * tokens + c] = store<T>(s * (dot - z * shared[head_dim]));
}

// One block per (row bn, position t, 128 output columns c): the block walks the cached tokens in
// chunks of 128, putting w_k = probs[t, k] * scale[k] in shared memory; each thread sums w_k * value_q[k, c]
// (consecutive threads read consecutive bytes of a value row) and, once for all, w_k * zero[k].
template <typename T>
__global__ void pv_kernel(const T* __restrict__ probs, const uint8_t* __restrict__ value_q,
                          const T* __restrict__ scale, const T* __restrict__ zero, T* __restrict__ out,
                          int positions, int tokens, int head_dim) {
  __shared__ float weight[kThreads];
  __shared__ float weighted_zero[kThreads];
  const int bn = blockIdx.z, t = blockIdx.y;
  const int c = blockIdx.x * kThreads + threadIdx.x;
  const T* p = probs + (static_cast<int64_t>(bn) * positions + t) * tokens;
  const uint8_t* values = value_q + static_cast<int64_t>(bn) * tokens * head_dim;
  float acc = 0.f, shift = 0.f;
  for (int start = 0; start < tokens; start += kThreads) {
    const int k = start + threadIdx.x;
    float w = 0.f, wz = 0.f;
    if (k < tokens) {
      const int64_t at = static_cast<int64_t>(bn) * tokens + k;
      w = load(p + k) * load(scale + at);
      wz = w * load(zero + at);
    }
    weight[threadIdx.x] = w;
    weighted_zero[threadIdx.x] = wz;
    __syncthreads();
    const int chunk = min(kThreads, tokens - start);
    if (c < head_dim) {
      for (int j = 0; j < chunk; ++j) {
        acc += weight[j] * values[static_cast<int64_t>(start + j) * head_dim + c];
        shift += weighted_zero[j];
      }
    }
    __syncthreads();
  }
  if (c < head_dim) out[(static_cast<int64_t>(bn) * positions + t) * head_dim + c] = store<T>(acc - shift);
}

template <typename T>
cudaError_t launch_qk(const void* query, const uint8_t* key_q, const void* scale, const void* zero, void* scores,
                      int rows, int positions, int tokens, int head_dim, cudaStream_t stream) {
  const dim3 grid((tokens + kThreads - 1) / kThreads, positions, rows);
  const size_t shared_bytes = (head_dim + 1) * sizeof(float);
  qk_kernel<T><<<grid, kThreads, shared_bytes, stream>>>(
      static_cast<const T*>(query), key_q, static_cast<const T*>(scale), static_cast<const T*>(zero),
      static_cast<T*>(scores), positions, tokens, head_dim);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pv(const void* probs, const uint8_t* value_q, const void* scale, const void* zero, void* out,
                      int rows, int positions, int tokens, int head_dim, cudaStream_t stream) {
  const dim3 grid((head_dim + kThreads - 1) / kThreads, positions, rows);
  pv_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(probs), value_q, static_cast<const T*>(scale), static_cast<const T*>(zero),
      static_cast<T*>(out), positions, tokens, head_dim);
  return cudaGetLastError();
}

}  // namespace qwen_cache

// dtype: 0 float32, 1 float16, 2 bfloat16 (what cache_kernels.cpp passes).
cudaError_t qwen_cache_qk(int dtype, const void* query, const uint8_t* key_q, const void* scale, const void* zero,
                          void* scores, int rows, int positions, int tokens, int head_dim, cudaStream_t stream) {
  using namespace qwen_cache;
  switch (dtype) {
    case 0: return launch_qk<float>(query, key_q, scale, zero, scores, rows, positions, tokens, head_dim, stream);
    case 1: return launch_qk<__half>(query, key_q, scale, zero, scores, rows, positions, tokens, head_dim, stream);
    case 2:
      return launch_qk<__nv_bfloat16>(query, key_q, scale, zero, scores, rows, positions, tokens, head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t qwen_cache_pv(int dtype, const void* probs, const uint8_t* value_q, const void* scale, const void* zero,
                          void* out, int rows, int positions, int tokens, int head_dim, cudaStream_t stream) {
  using namespace qwen_cache;
  switch (dtype) {
    case 0: return launch_pv<float>(probs, value_q, scale, zero, out, rows, positions, tokens, head_dim, stream);
    case 1: return launch_pv<__half>(probs, value_q, scale, zero, out, rows, positions, tokens, head_dim, stream);
    case 2:
      return launch_pv<__nv_bfloat16>(probs, value_q, scale, zero, out, rows, positions, tokens, head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}
