// The two products of attention over Qwen's int8 KV cache (`use_cache_quantization`), on CUDA.
//
// This file is also written into saved checkpoints as remote code, beside cache_kernels.py, which
// builds it on first use (torch.utils.cpp_extension) together with cache_kernels.cpp. What each
// thread computes, and the launch plan, are in cache_kernels.cuh (tested on the CPU as well); this
// file only maps blockIdx/threadIdx onto it and launches.
//
//   qk: one thread per cached token (its whole row of keys, 16 bytes per load when aligned), so a
//       long cache gives many blocks.
//   pv: split-K: when decoding, a few (row, position) pairs meet thousands of cached tokens; each
//       block sums one chunk of tokens for all columns (a warp reads whole value rows, 4 bytes per
//       thread), and a second kernel adds the chunks in order.

#include <cuda_runtime.h>

#include "cache_kernels.cuh"

namespace qwen_cache {

template <typename T> __global__ void qk_kernel(QkArgs<T> args) {
  qk_thread(args, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
}

template <typename T> __global__ void pv_partial_kernel(PvArgs<T> args) {
  pv_partial_thread(args, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
}

template <typename T> __global__ void pv_reduce_kernel(PvArgs<T> args) {
  pv_reduce_thread(args, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
}

template <typename T>
cudaError_t launch_qk(const void* query, const Cache& keys, void* scores, int rows, int positions, int tokens,
                      int head_dim, cudaStream_t stream) {
  const QkArgs<T> args{static_cast<const T*>(query), keys, static_cast<T*>(scores), positions, tokens,
                       head_dim};
  const dim3 grid((tokens + kQkThreads - 1) / kQkThreads, positions, rows);
  qk_kernel<T><<<grid, kQkThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pv(const void* probs, const Cache& values, void* out, float* partial, const PvPlan& plan,
                      int rows, int positions, int tokens, int head_dim, cudaStream_t stream) {
  const PvArgs<T> args{static_cast<const T*>(probs), values, static_cast<T*>(out), partial, positions,
                       tokens, head_dim, plan};
  pv_partial_kernel<T><<<dim3(plan.splits, positions, rows), plan.threads, 0, stream>>>(args);
  if (plan.splits > 1) {
    const dim3 grid((head_dim + kReduceThreads - 1) / kReduceThreads, positions, rows);
    pv_reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

}  // namespace qwen_cache

// dtype: 0 float32, 1 float16, 2 bfloat16 (what cache_kernels.cpp passes).
cudaError_t qwen_cache_qk(int dtype, const void* query, const qwen_cache::Cache& keys, void* scores, int rows,
                          int positions, int tokens, int head_dim, cudaStream_t stream) {
  using namespace qwen_cache;
  switch (dtype) {
    case 0: return launch_qk<float>(query, keys, scores, rows, positions, tokens, head_dim, stream);
    case 1: return launch_qk<__half>(query, keys, scores, rows, positions, tokens, head_dim, stream);
    case 2: return launch_qk<__nv_bfloat16>(query, keys, scores, rows, positions, tokens, head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}

// `plan`: plan_pv(rows, positions, tokens, head_dim); `partial`: float32 scratch of rows * positions *
// plan.splits * head_dim values when plan.splits > 1 (else unused).
cudaError_t qwen_cache_pv(int dtype, const void* probs, const qwen_cache::Cache& values, void* out, float* partial,
                          const qwen_cache::PvPlan& plan, int rows, int positions, int tokens, int head_dim,
                          cudaStream_t stream) {
  using namespace qwen_cache;
  switch (dtype) {
    case 0: return launch_pv<float>(probs, values, out, partial, plan, rows, positions, tokens, head_dim, stream);
    case 1: return launch_pv<__half>(probs, values, out, partial, plan, rows, positions, tokens, head_dim, stream);
    case 2:
      return launch_pv<__nv_bfloat16>(probs, values, out, partial, plan, rows, positions, tokens, head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}
