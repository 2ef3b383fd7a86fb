// Runs the int8 KV-cache kernels' per-thread code (qwen/cache_kernels.cuh) on the CPU, every
// (block, thread) of each launch the .cu file makes, for float32. tests/test_cache_kernels.py
// compiles this with g++ and calls it through ctypes: the index arithmetic, the load widths, the
// tails and the split-K plan are checked against the torch path without a GPU.

#include <cstdint>
#include <vector>

#include "cache_kernels.cuh"

using namespace qwen_cache;

namespace {

// strides: data batch, data head, scale batch, scale head, zero batch, zero head (in elements).
Cache cache_of(const uint8_t* data, const float* scale, const float* zero, const int64_t* strides, int heads,
               int head_dim) {
  return Cache{data,
               scale,
               zero,
               Rows{strides[0], strides[1], heads},
               Rows{strides[2], strides[3], heads},
               Rows{strides[4], strides[5], heads},
               load_width(data, strides[0], strides[1], head_dim)};
}

}  // namespace

extern "C" {

// scores [rows, positions, tokens] = query [rows, positions, head_dim] @ dequantized(keys)^T.
// Returns the load width the kernel used.
int host_qk(const float* query, const uint8_t* data, const float* scale, const float* zero, const int64_t* strides,
            int heads, float* scores, int rows, int positions, int tokens, int head_dim) {
  const QkArgs<float> args{query, cache_of(data, scale, zero, strides, heads, head_dim), scores, positions, tokens,
                           head_dim};
  const int blocks = (tokens + kQkThreads - 1) / kQkThreads;
  for (int bn = 0; bn < rows; ++bn)
    for (int t = 0; t < positions; ++t)
      for (int bx = 0; bx < blocks; ++bx)
        for (int thread = 0; thread < kQkThreads; ++thread) qk_thread(args, bx, t, bn, thread);
  return args.keys.width;
}

// out [rows, positions, head_dim] = probs [rows, positions, tokens] @ dequantized(values).
// Returns the number of splits the plan chose (pass 2 runs when it is above 1).
int host_pv(const float* probs, const uint8_t* data, const float* scale, const float* zero, const int64_t* strides,
            int heads, float* out, int rows, int positions, int tokens, int head_dim) {
  const PvPlan plan = plan_pv(rows, positions, tokens, head_dim);
  std::vector<float> partial(plan.splits > 1 ? static_cast<size_t>(rows) * positions * plan.splits * head_dim : 0);
  const PvArgs<float> args{probs,     cache_of(data, scale, zero, strides, heads, head_dim),
                           out,       partial.empty() ? nullptr : partial.data(),
                           positions, tokens,
                           head_dim,  plan};
  for (int bn = 0; bn < rows; ++bn)
    for (int t = 0; t < positions; ++t)
      for (int s = 0; s < plan.splits; ++s)
        for (int thread = 0; thread < plan.threads; ++thread) pv_partial_thread(args, s, t, bn, thread);
  if (plan.splits > 1) {
    const int blocks = (head_dim + kReduceThreads - 1) / kReduceThreads;
    for (int bn = 0; bn < rows; ++bn)
      for (int t = 0; t < positions; ++t)
        for (int bx = 0; bx < blocks; ++bx)
          for (int thread = 0; thread < kReduceThreads; ++thread) pv_reduce_thread(args, bx, t, bn, thread);
  }
  return plan.splits;
}

}  // extern "C"
