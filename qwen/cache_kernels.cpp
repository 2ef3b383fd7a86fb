// torch binding of cache_kernels.cu (attention products over Qwen's int8 KV cache, CUDA).
//
// This file is also written into saved checkpoints as remote code, beside cache_kernels.py.
//
//   qk(query [B, N, T, d], key_q uint8 [B, N, K, d], scale [B, N, K, 1], zero [B, N, K, 1]) -> [B, N, T, K]
//   pv(probs [B, N, T, K], value_q uint8 [B, N, K, d], scale [B, N, K, 1], zero [B, N, K, 1]) -> [B, N, T, d]
//
// query / probs, scale and zero share one floating dtype (float32, float16 or bfloat16), which the
// result has; everything is on one CUDA device. Non-contiguous inputs are made contiguous first.
// The caller (cache_kernels.py) makes that device current and passes its current stream as an
// integer: the binding then needs no c10/cuda header, which torch's CPU wheels lack, so CI without
// a GPU compiles this file as it is.

#include <cuda_runtime.h>
#include <torch/extension.h>

cudaError_t qwen_cache_qk(int dtype, const void* query, const uint8_t* key_q, const void* scale, const void* zero,
                          void* scores, int rows, int positions, int tokens, int head_dim, cudaStream_t stream);
cudaError_t qwen_cache_pv(int dtype, const void* probs, const uint8_t* value_q, const void* scale, const void* zero,
                          void* out, int rows, int positions, int tokens, int head_dim, cudaStream_t stream);

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
  TORCH_CHECK(x.dim() == 4 && cache.dim() == 4, what, ": expected 4-d [batch, heads, ., .] tensors");
  TORCH_CHECK(cache.scalar_type() == at::kByte, what, ": the cache must be uint8, got ", cache.scalar_type());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type() && zero.scalar_type() == x.scalar_type(), what,
              ": scale and zero must have the dtype of the activations");
  TORCH_CHECK(x.size(0) == cache.size(0) && x.size(1) == cache.size(1), what, ": batch and heads differ");
  TORCH_CHECK(scale.numel() == cache.size(0) * cache.size(1) * cache.size(2) && zero.numel() == scale.numel(), what,
              ": scale and zero need one value per cached token");
}

void ok(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace

at::Tensor qk(const at::Tensor& query, const at::Tensor& key_q, const at::Tensor& scale, const at::Tensor& zero,
             int64_t stream) {
  check(query, key_q, scale, zero, "qk");
  TORCH_CHECK(query.size(3) == key_q.size(3), "qk: query and keys have different head sizes");
  auto q = query.contiguous(), k = key_q.contiguous(), s = scale.contiguous(), z = zero.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), positions = q.size(2), head_dim = q.size(3);
  const int64_t tokens = k.size(2);
  auto scores = at::empty({batch, heads, positions, tokens}, q.options());
  if (scores.numel() == 0) return scores;
  ok(qwen_cache_qk(dtype_code(q), q.data_ptr(), k.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), scores.data_ptr(),
                   static_cast<int>(batch * heads), static_cast<int>(positions), static_cast<int>(tokens),
                   static_cast<int>(head_dim), reinterpret_cast<cudaStream_t>(stream)),
     "qk");
  return scores;
}

at::Tensor pv(const at::Tensor& probs, const at::Tensor& value_q, const at::Tensor& scale, const at::Tensor& zero,
             int64_t stream) {
  check(probs, value_q, scale, zero, "pv");
  TORCH_CHECK(probs.size(3) == value_q.size(2), "pv: probabilities and values cover different tokens");
  auto p = probs.contiguous(), v = value_q.contiguous(), s = scale.contiguous(), z = zero.contiguous();
  const int64_t batch = p.size(0), heads = p.size(1), positions = p.size(2), tokens = p.size(3);
  const int64_t head_dim = v.size(3);
  auto out = at::empty({batch, heads, positions, head_dim}, p.options());
  if (out.numel() == 0) return out;
  ok(qwen_cache_pv(dtype_code(p), p.data_ptr(), v.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), out.data_ptr(),
                   static_cast<int>(batch * heads), static_cast<int>(positions), static_cast<int>(tokens),
                   static_cast<int>(head_dim), reinterpret_cast<cudaStream_t>(stream)),
     "pv");
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qk", &qk, "query @ dequantized(key_q)^T over the int8 KV cache", py::arg("query"), py::arg("key_q"),
        py::arg("scale"), py::arg("zero"), py::arg("stream"));
  m.def("pv", &pv, "probs @ dequantized(value_q) over the int8 KV cache", py::arg("probs"), py::arg("value_q"),
        py::arg("scale"), py::arg("zero"), py::arg("stream"));
}
