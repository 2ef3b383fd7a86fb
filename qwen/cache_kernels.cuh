// What one CUDA thread of the int8 KV-cache kernels computes, and how the work is cut into blocks.
//
// Shared by cache_kernels.cu (the __global__ kernels call these functions with blockIdx/threadIdx),
// cache_kernels.cpp (the binding plans the launch and describes the tensors) and, compiled as plain
// C++, by tests/cache_kernels_host.cpp, which runs every (block, thread) of the same functions on
// the CPU: the index arithmetic, the tails and the split-K plan are tested without a GPU. No
// thread reads what another wrote in the same kernel (no shared memory, no barriers), which is
// what makes running them one after the other on the CPU exact.
//
// This file is also written into saved checkpoints as remote code, beside cache_kernels.py.
//
// Semantics (x = scale * (q - zero), one (scale, zero) per (batch, head, token)):
//   qk: scores[bn, t, c] = scale[bn, c] * sum_k query[bn, t, k] * (key_q[bn, c, k] - zero[bn, c])
//   pv: out[bn, t, j]    = sum_c probs[bn, t, c] * scale[bn, c] * (value_q[bn, c, j] - zero[bn, c])
// bn = b * heads + n. Each sum runs in float32 in a fixed order (no atomics): the same inputs give
// the same bits on every run. The cache may be a view of a larger buffer (the model's cache grows
// in place): only its batch and head strides are free, tokens and head_dim must be dense.

#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QWEN_HD __host__ __device__ __forceinline__
#else
#define QWEN_HD inline
#endif

namespace qwen_cache {

constexpr int kQkThreads = 128;    // cached tokens per qk block, one per thread
constexpr int kReduceThreads = 128;
constexpr int kPvColumns = 4;      // value bytes per pv thread (one 32-bit load)
constexpr int kPvMinChunk = 64;    // fewest tokens a pv block sums
constexpr int kPvWantBlocks = 4096;  // enough small blocks to fill a large GPU when decoding

QWEN_HD float to_float(float x) { return x; }
QWEN_HD float from_float(float x, float*) { return x; }
#ifdef __CUDACC__
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __half from_float(float x, __half*) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 from_float(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }
#endif

template <typename T> QWEN_HD void store(T* at, float x) { *at = from_float(x, at); }

// Where row bn = b * heads + n of a [batch, heads, ...] tensor starts, in elements.
struct Rows {
  int64_t batch_stride, head_stride;
  int heads;
  QWEN_HD int64_t at(int bn) const { return (bn / heads) * batch_stride + (bn % heads) * head_stride; }
};

// One int8 cache (keys or values): uint8 [B, N, K, d] with rows of d bytes per token, and scale/zero
// [B, N, K, 1] with one value per token; `width` (16, 4 or 1) is the widest load every row start
// is aligned to. scale and zero have the activations' dtype T (the kernels' template argument).
struct Cache {
  const uint8_t* data;
  const void* scale;
  const void* zero;
  Rows data_rows, scale_rows, zero_rows;
  int width;
};

// Four bytes of a cache row (a 4-aligned address) as one word, lowest address in the low byte.
QWEN_HD uint32_t load_word(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t word;
  std::memcpy(&word, p, 4);
  return word;
#endif
}

// Sixteen bytes (a 16-aligned address) as four words.
QWEN_HD void load_words16(const uint8_t* p, uint32_t words[4]) {
#ifdef __CUDA_ARCH__
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
#else
  std::memcpy(words, p, 16);
#endif
}

QWEN_HD float byte_of(uint32_t word, int i) { return static_cast<float>((word >> (8 * i)) & 0xffu); }

// ---- qk: grid (ceil(tokens / kQkThreads), positions, rows), kQkThreads threads ----

template <typename T> struct QkArgs {
  const T* query;  // [rows, positions, head_dim], contiguous
  Cache keys;
  T* scores;       // [rows, positions, tokens], contiguous
  int positions, tokens, head_dim;
};

// Thread `thread` of block (bx, t, bn): the score of cached token c = bx * kQkThreads + thread.
template <typename T> QWEN_HD void qk_thread(const QkArgs<T>& a, int bx, int t, int bn, int thread) {
  const int c = bx * kQkThreads + thread;
  if (c >= a.tokens) return;
  const int d = a.head_dim;
  const T* q = a.query + (static_cast<int64_t>(bn) * a.positions + t) * d;
  const uint8_t* key = a.keys.data + a.keys.data_rows.at(bn) + static_cast<int64_t>(c) * d;
  const float zero = to_float(static_cast<const T*>(a.keys.zero)[a.keys.zero_rows.at(bn) + c]);
  float dot = 0.f;  // summed k = 0, 1, ..., d - 1 whatever the load width
  int k = 0;
  if (a.keys.width >= 16) {
    for (; k + 16 <= d; k += 16) {
      uint32_t words[4];
      load_words16(key + k, words);
      for (int w = 0; w < 4; ++w)
        for (int i = 0; i < 4; ++i) dot += to_float(q[k + 4 * w + i]) * (byte_of(words[w], i) - zero);
    }
  }
  if (a.keys.width >= 4) {
    for (; k + 4 <= d; k += 4) {
      const uint32_t word = load_word(key + k);
      for (int i = 0; i < 4; ++i) dot += to_float(q[k + i]) * (byte_of(word, i) - zero);
    }
  }
  for (; k < d; ++k) dot += to_float(q[k]) * (static_cast<float>(key[k]) - zero);
  const float scale = to_float(static_cast<const T*>(a.keys.scale)[a.keys.scale_rows.at(bn) + c]);
  store(a.scores + (static_cast<int64_t>(bn) * a.positions + t) * a.tokens + c, scale * dot);
}

// ---- pv: split-K ----
// Decoding has few (row, position) pairs and many cached tokens, so the tokens are cut into
// `splits` chunks. pass 1, grid (splits, positions, rows), `columns_per_block` threads: thread x
// of block (s, t, bn) sums chunk s for the kPvColumns output columns from x * kPvColumns, into `out`
// when there is one split, else into partial[bn, t, s, :] (float32). pass 2 (only when splits > 1),
// grid (ceil(head_dim / kReduceThreads), positions, rows): adds the partials in split order.

struct PvPlan {
  int splits, chunk, threads;
};

inline PvPlan plan_pv(int rows, int positions, int tokens, int head_dim) {
  const int64_t pairs = static_cast<int64_t>(rows) * positions;
  int64_t splits = (kPvWantBlocks + pairs - 1) / pairs;
  const int64_t most = (tokens + kPvMinChunk - 1) / kPvMinChunk;
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  const int chunk = static_cast<int>((tokens + splits - 1) / splits);
  PvPlan plan;
  plan.chunk = chunk > 0 ? chunk : 1;
  plan.splits = static_cast<int>((tokens + plan.chunk - 1) / plan.chunk);  // no empty chunk
  if (plan.splits < 1) plan.splits = 1;
  plan.threads = (head_dim + kPvColumns - 1) / kPvColumns;
  return plan;
}

template <typename T> struct PvArgs {
  const T* probs;  // [rows, positions, tokens], contiguous
  Cache values;
  T* out;          // [rows, positions, head_dim], contiguous
  float* partial;  // [rows, positions, splits, head_dim] when splits > 1
  int positions, tokens, head_dim;
  PvPlan plan;
};

template <typename T> QWEN_HD void pv_partial_thread(const PvArgs<T>& a, int split, int t, int bn, int thread) {
  const int d = a.head_dim, first = thread * kPvColumns;
  if (first >= d) return;
  const int columns = d - first < kPvColumns ? d - first : kPvColumns;
  const bool word = columns == kPvColumns && a.values.width >= 4;
  const int begin = split * a.plan.chunk;
  const int end = begin + a.plan.chunk < a.tokens ? begin + a.plan.chunk : a.tokens;
  const int64_t pair = static_cast<int64_t>(bn) * a.positions + t;
  const T* p = a.probs + pair * a.tokens;
  const uint8_t* values = a.values.data + a.values.data_rows.at(bn) + first;
  const T* scale = static_cast<const T*>(a.values.scale) + a.values.scale_rows.at(bn);
  const T* zero = static_cast<const T*>(a.values.zero) + a.values.zero_rows.at(bn);
  float acc[kPvColumns] = {0.f, 0.f, 0.f, 0.f};
  for (int c = begin; c < end; ++c) {
    const float w = to_float(p[c]) * to_float(scale[c]), z = to_float(zero[c]);
    const uint8_t* row = values + static_cast<int64_t>(c) * d;
    if (word) {
      const uint32_t bytes = load_word(row);
      for (int i = 0; i < kPvColumns; ++i) acc[i] += w * (byte_of(bytes, i) - z);
    } else {
      for (int i = 0; i < columns; ++i) acc[i] += w * (static_cast<float>(row[i]) - z);
    }
  }
  if (a.plan.splits == 1) {
    for (int i = 0; i < columns; ++i) store(a.out + pair * d + first + i, acc[i]);
  } else {
    float* dst = a.partial + (pair * a.plan.splits + split) * d + first;
    for (int i = 0; i < columns; ++i) dst[i] = acc[i];
  }
}

template <typename T> QWEN_HD void pv_reduce_thread(const PvArgs<T>& a, int bx, int t, int bn, int thread) {
  const int j = bx * kReduceThreads + thread, d = a.head_dim;
  if (j >= d) return;
  const int64_t pair = static_cast<int64_t>(bn) * a.positions + t;
  const float* parts = a.partial + pair * a.plan.splits * d + j;
  float sum = 0.f;
  for (int s = 0; s < a.plan.splits; ++s) sum += parts[static_cast<int64_t>(s) * d];
  store(a.out + pair * d + j, sum);
}

// The widest load (16, 4 or 1 bytes) that every cache row start allows: the base address, the batch
// and head strides and the token stride (head_dim) must all be multiples of it.
inline int load_width(const void* data, int64_t batch_stride, int64_t head_stride, int head_dim) {
  const uint64_t bits = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(data)) | static_cast<uint64_t>(batch_stride) |
                        static_cast<uint64_t>(head_stride) | static_cast<uint64_t>(head_dim);
  return bits % 16 == 0 ? 16 : bits % 4 == 0 ? 4 : 1;
}

}  // namespace qwen_cache
