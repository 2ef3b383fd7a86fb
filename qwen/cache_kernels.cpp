// torch binding of cache_kernels.cu (attention products over Qwen's int8 KV cache, CUDA).
//
// This file is also written into saved checkpoints as remote code, beside cache_kernels.py.
//
//   qk(query [B, N, T, d], key_q uint8 [B, N, K, d], scale [B, N, K, 1], zero [B, N, K, 1]) -> [B, N, T, K]
//   pv(probs [B, N, T, K], value_q uint8 [B, N, K, d], scale [B, N, K, 1], zero [B, N, K, 1]) -> [B, N, T, d]
//
// query / probs, scale and zero share one floating dtype (float32, float16 or bfloat16), which the
// result has; everything is on one CUDA device. The cache tensors are read in place when only their
// batch and head strides are unusual (a view of the model's growing cache buffer); anything else
// is made contiguous first. The caller (cache_kernels.py) makes that device current and passes its
// current stream as an integer: the binding then needs no c10/cuda header, which torch's CPU wheels
// lack, so CI without a GPU compiles this file as it is.

#include <cuda_runtime.h>
#include <torch/extension.h>

#include "cache_kernels.cuh"

cudaError_t qwen_cache_qk(int dtype, const void* query, const qwen_cache::Cache& keys, void* scores, int rows,
                          int positions, int tokens, int head_dim, cudaStream_t stream);
cudaError_t qwen_cache_pv(int dtype, const void* probs, const qwen_cache::Cache& values, void* out, float* partial,
                          const qwen_cache::PvPlan& plan, int rows, int positions, int tokens, int head_dim,
                          cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "int8 cache kernels: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& scale, const at::Tensor& zero,
           const char* what) {
  TORCH_CHECK(x.is_cuda() && cache.is_cuda() && scale.is_cuda() && zero.is_cuda(), what,
              ": every tensor must be on a CUDA device");
  TORCH_CHECK(x.dim() == 4 && cache.dim() == 4 && scale.dim() == 4 && zero.dim() == 4, what,
              ": expected 4-d [batch, heads, ., .] tensors");
  TORCH_CHECK(cache.scalar_type() == at::kByte, what, ": the cache must be uint8, got ", cache.scalar_type());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && zero.scalar_type() == x.scalar_type(), what,
              ": scale and zero must have the dtype of the activations");
  TORCH_CHECK(x.size(0) == cache.size(0) && x.size(1) == cache.size(1), what, ": batch and heads differ");
  for (const at::Tensor* p : {&scale, &zero})
    TORCH_CHECK(p->size(0) == cache.size(0) && p->size(1) == cache.size(1) && p->size(2) == cache.size(2) &&
                    p->size(3) == 1, what, ": scale and zero must be [batch, heads, tokens, 1] like the cache");
}

qwen_cache::Rows rows_of(const at::Tensor& t) {
  return qwen_cache::Rows{t.stride(0), t.stride(1), static_cast<int>(t.size(1))};
}

// The cache as the kernels read it; `keep` holds any contiguous copies alive until the launch.
qwen_cache::Cache describe(const at::Tensor& cache, const at::Tensor& scale, const at::Tensor& zero,
                           std::vector<at::Tensor>& keep) {
  const int64_t head_dim = cache.size(3);
  const bool dense_rows = cache.size(2) <= 1 || cache.stride(2) == head_dim;
  keep.push_back(cache.stride(3) == 1 && dense_rows ? cache : cache.contiguous());
  for (const at::Tensor* p : {&scale, &zero})
    keep.push_back(p->size(2) <= 1 || p->stride(2) == 1 ? *p : p->contiguous());
  const at::Tensor &c = keep[keep.size() - 3], &s = keep[keep.size() - 2], &z = keep[keep.size() - 1];
  return qwen_cache::Cache{c.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), rows_of(c), rows_of(s), rows_of(z),
                           qwen_cache::load_width(c.data_ptr(), c.stride(0), c.stride(1), static_cast<int>(head_dim))};
}

void ok(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace

at::Tensor qk(const at::Tensor& query, const at::Tensor& key_q, const at::Tensor& scale, const at::Tensor& zero,
             int64_t stream) {
  check(query, key_q, scale, zero, "qk");
  TORCH_CHECK(query.size(3) == key_q.size(3), "qk: query and keys have different head sizes");
  auto q = query.contiguous();
  std::vector<at::Tensor> keep;
  const qwen_cache::Cache keys = describe(key_q, scale, zero, keep);
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), head_dim = q.size(3);
  const int64_t tokens = key_q.size(2);
  auto scores = at::empty({batch, heads, positions, tokens}, q.options());
  if (scores.numel() == 0) return scores;
  ok(qwen_cache_qk(dtype_code(q), q.data_ptr(), keys, scores.data_ptr(), static_cast<int>(batch * heads),
                   static_cast<int>(positions), static_cast<int>(tokens), static_cast<int>(head_dim),
                   reinterpret_cast<cudaStream_t>(stream)),
     "qk");
  return scores;
}

at::Tensor pv(const at::Tensor& probs, const at::Tensor& value_q, const at::Tensor& scale, const at::Tensor& zero,
             int64_t stream) {
  check(probs, value_q, scale, zero, "pv");
  TORCH_CHECK(probs.size(3) == value_q.size(2), "pv: probabilities and values cover different tokens");
  auto p = probs.contiguous();
  std::vector<at::Tensor> keep;
  const qwen_cache::Cache values = describe(value_q, scale, zero, keep);
  const int64_t batch = p.size(0), heads = p.size(1), positions = p.size(2), tokens = p.size(3);
  const int64_t head_dim = value_q.size(3);
  auto out = at::empty({batch, heads, positions, head_dim}, p.options());
  if (out.numel() == 0) return out;
  if (tokens == 0) return out.zero_();
  const int rows = static_cast<int>(batch * heads);
  const qwen_cache::PvPlan plan = qwen_cache::plan_pv(rows, static_cast<int>(positions), static_cast<int>(tokens),
                                                      static_cast<int>(head_dim));
  at::Tensor partial;
  if (plan.splits > 1) partial = at::empty({rows * positions * plan.splits * head_dim}, p.options().dtype(at::kFloat));
  ok(qwen_cache_pv(dtype_code(p), p.data_ptr(), values, out.data_ptr(),
                   plan.splits > 1 ? partial.data_ptr<float>() : nullptr, plan, rows, static_cast<int>(positions),
                   static_cast<int>(tokens), static_cast<int>(head_dim), reinterpret_cast<cudaStream_t>(stream)),
     "pv");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qk", &qk, "query @ dequantized(key_q)^T over the int8 KV cache", py::arg("query"), py::arg("key_q"),
        py::arg("scale"), py::arg("zero"), py::arg("stream"));
  m.def("pv", &pv, "probs @ dequantized(value_q) over the int8 KV cache", py::arg("probs"), py::arg("value_q"),
        py::arg("scale"), py::arg("zero"), py::arg("stream"));
}
