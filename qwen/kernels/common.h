// What the kernel sources of this extension (cpu_gemv.cpp, cpu_qgemv.cpp, cpu_ops.cpp) share: the
// path levels, dtype kinds, the row limit and the tensor checks. Each source includes it into its
// own unnamed namespace (one copy per translation unit, nothing exported).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace {

enum Isa : int64_t { kTorch = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
enum Kind : int { kNone = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

constexpr int64_t kMaxRows = 16;  // activation rows per call (qwen.kernels.MAX_ROWS)

inline Kind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      return kNone;
  }
}

// A CPU tensor with storage and strides (autograd is the callers' business).
inline bool plain_cpu(const at::Tensor& t) {
  return t.defined() && t.is_cpu() && t.layout() == at::kStrided && t.has_storage();
}

}  // namespace
