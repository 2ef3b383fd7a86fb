// A transformer block's decode step (QWenBlock.decode) in two calls instead of about fifteen:
//
//   qkv(h, cos, sin) -> (q, k, v): RMSNorm, c_attn, rotary; v a view of c_attn's output.
//   (the caller writes k and v into its cache and passes what attention is to read)
//   out(h, q, keys, values, bias, causal) -> h': attention, c_proj, the residual, RMSNorm, w1 and
//     w2, w1 * silu(w2), c_proj, the residual.
//
// Each part is the kernel (or torch op) the modules' forwards run for a decode step, in the same
// order on the same operands, so the result is bit for bit QWenBlock.decode's; what goes is the
// Python between them: the module calls, attribute look-ups and argument parsing. A decode step of
// a 24-block model of hidden size 128 took 3.1 ms instead of 4.8 (fp16; bf16 2.8 instead of 3.9;
// Zen 3, 2 threads, alternating): ~1-3% of a Qwen-1.8B step, 16-bit to int4. Either call returns None
// where one of its kernels declines (e.g. int8/int4 weights with activations other than bf16): the
// caller then runs the modules from that point, which compute the same thing.
//
// run_blocks(blocks, h, cos, sin, keys, values, position, biases, causal) runs consecutive blocks'
// steps in one call, storing each block's keys and values itself into a plain cache buffer
// [B, H, capacity, d] at `position` (as PreallocatedLayer / the engine's slots do), so that a step
// crosses from Python to C++ once instead of three times per block: the 24-block, hidden-128 model
// above decodes a token (generate) in 4.7 ms instead of 6.4 block by block (fp16, Zen 3 in a slow
// hour, alternating, 9 rounds); on Qwen-1.8B fp16 146 vs 154 ms, within that hour's noise.

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace qwen_kernels {
// The kernels' entry points (cpu_gemv.cpp, cpu_qgemv.cpp, cpu_ops.cpp), as Python calls them.
std::optional<at::Tensor> gemv_op(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  int64_t isa);
std::optional<at::Tensor> int8_gemv_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                       const std::optional<at::Tensor>& bias, int64_t isa);
std::optional<at::Tensor> int4_gemv_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                       const at::Tensor& mins, int64_t group, const std::optional<at::Tensor>& bias,
                                       int64_t isa, bool exact);
std::optional<at::Tensor> attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& bias, bool causal, double scale, int64_t isa);
std::optional<at::Tensor> rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps);
std::optional<std::tuple<at::Tensor, at::Tensor>> rotary_qk_op(const at::Tensor& qkv, const at::Tensor& cos,
                                                               const at::Tensor& sin, int64_t heads, int64_t head_dim);
void bind_decode(pybind11::module_& m);
}  // namespace qwen_kernels

namespace {

using qwen_kernels::rms_norm_op;

enum LinearKind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2 };

// One linear layer as its module computes a decode step: KernelLinear (gemv on its weight),
// Int8Linear (int8_gemv on qweight, scale) or Int4Linear (int4_gemv on packed, scales, mins); the
// quantized ones only for bf16 activations, as their forwards.
struct Linear {
  int64_t kind;
  at::Tensor weight, scales, mins;  // dense: weight; int8: qweight, scale; int4: packed, scales, mins
  std::optional<at::Tensor> bias;
  int64_t group;
  bool exact;

  std::optional<at::Tensor> operator()(const at::Tensor& x, int64_t isa) const {
    if (kind == kDense) return qwen_kernels::gemv_op(x, weight, bias, isa);
    if (x.scalar_type() != at::kBFloat16) return std::nullopt;
    if (kind == kInt8) return qwen_kernels::int8_gemv_op(x, weight, scales, bias, isa);
    return qwen_kernels::int4_gemv_op(x, weight, scales, mins, group, bias, isa, exact);
  }
};

Linear make_linear(int64_t kind, at::Tensor weight, std::optional<at::Tensor> scales, std::optional<at::Tensor> mins,
                   std::optional<at::Tensor> bias, int64_t group, bool exact) {
  TORCH_CHECK(kind == kDense || kind == kInt8 || kind == kInt4, "DecodeLinear: unknown kind ", kind);
  TORCH_CHECK(kind == kDense || scales.has_value(), "DecodeLinear: quantized weights need their scales");
  TORCH_CHECK(kind != kInt4 || mins.has_value(), "DecodeLinear: int4 weights need their mins");
  return Linear{kind, std::move(weight), scales.value_or(at::Tensor()), mins.value_or(at::Tensor()),
                std::move(bias), group, exact};
}

class DecodeBlock {
 public:
  DecodeBlock(at::Tensor ln_1, double eps_1, at::Tensor ln_2, double eps_2, Linear c_attn, Linear attn_proj,
              Linear w1, Linear w2, Linear mlp_proj, int64_t heads, int64_t head_dim, int64_t isa)
      : ln_1_(std::move(ln_1)),
        ln_2_(std::move(ln_2)),
        eps_1_(eps_1),
        eps_2_(eps_2),
        c_attn_(std::move(c_attn)),
        attn_proj_(std::move(attn_proj)),
        w1_(std::move(w1)),
        w2_(std::move(w2)),
        mlp_proj_(std::move(mlp_proj)),
        heads_(heads),
        head_dim_(head_dim),
        // kernels.attention's default scale: Python's head_dim ** -0.5 is C's pow.
        scale_(std::pow(static_cast<double>(head_dim), -0.5)),
        isa_(isa) {
    TORCH_CHECK(heads > 0 && head_dim > 0, "DecodeBlock: heads and head_dim must be positive");
  }

  // QWenAttention.decode up to the cache write: (q, k) rotated [B, H, T, d], v [B, H, T, d] (a view).
  std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> qkv(const at::Tensor& h, const at::Tensor& cos,
                                                                    const at::Tensor& sin) const {
    const auto x = rms_norm_op(h, ln_1_, eps_1_);
    if (!x) return std::nullopt;
    const auto y = c_attn_(*x, isa_);
    if (!y || y->dim() != 3) return std::nullopt;
    const auto rotated = qwen_kernels::rotary_qk_op(*y, cos, sin, heads_, head_dim_);
    if (!rotated) return std::nullopt;
    const int64_t hidden = heads_ * head_dim_;
    if (y->size(2) != 3 * hidden) return std::nullopt;
    at::Tensor v = y->narrow(2, 2 * hidden, hidden)
                       .view({y->size(0), y->size(1), heads_, head_dim_})
                       .transpose(1, 2);
    return std::make_tuple(std::get<0>(*rotated), std::get<1>(*rotated), v);
  }

  // The rest of QWenBlock.decode once the cache holds this step's keys and values.
  std::optional<at::Tensor> out(const at::Tensor& h, const at::Tensor& q, const at::Tensor& keys,
                                const at::Tensor& values, const std::optional<at::Tensor>& bias, bool causal) const {
    const auto attended = qwen_kernels::attention_op(q, keys, values, bias, causal, scale_, isa_);
    if (!attended) return std::nullopt;
    const auto projected = attn_proj_(*attended, isa_);
    if (!projected) return std::nullopt;
    const at::Tensor h1 = at::add(h, *projected);
    const auto x = rms_norm_op(h1, ln_2_, eps_2_);
    if (!x) return std::nullopt;
    const auto up = w1_(*x, isa_);
    if (!up) return std::nullopt;
    const auto gate = w2_(*x, isa_);  // w2 is the gated branch
    if (!gate) return std::nullopt;
    const auto down = mlp_proj_(at::mul(*up, at::silu(*gate)), isa_);
    if (!down) return std::nullopt;
    return at::add(h1, *down);
  }

 private:
  at::Tensor ln_1_, ln_2_;
  double eps_1_, eps_2_;
  Linear c_attn_, attn_proj_, w1_, w2_, mlp_proj_;
  int64_t heads_, head_dim_;
  double scale_;
  int64_t isa_;
};

using Pending = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (q, keys, values) of a half-done block

// blocks[0..n) in turn on h; block i's keys and values go to keys[i] / values[i] [B, H, capacity, d]
// at position .. position + T - 1, and its attention reads positions 0 .. position + T - 1.
// Returns (h, blocks done, pending): where block i's qkv declines, (h before it, i, None); where its
// out declines after the write, (h before it, i, (q, keys, values)) for the caller to finish it.
std::tuple<at::Tensor, int64_t, std::optional<Pending>> run_blocks(
    const std::vector<const DecodeBlock*>& blocks, at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
    const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values, int64_t position,
    const std::vector<std::optional<at::Tensor>>& biases, bool causal) {
  const auto n = static_cast<int64_t>(blocks.size());
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == n && static_cast<int64_t>(values.size()) == n &&
                  static_cast<int64_t>(biases.size()) == n,
              "run_blocks: one key buffer, value buffer and bias per block");
  TORCH_CHECK(position >= 0, "run_blocks: position must be >= 0");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(blocks[i] != nullptr, "run_blocks: block ", i, " is None");
    auto qkv = blocks[i]->qkv(h, cos, sin);
    if (!qkv) return {h, i, std::nullopt};
    const auto& [q, k, v] = *qkv;
    const int64_t length = k.size(2), end = position + length;
    for (const auto* pair : {&keys[i], &values[i]}) {
      const at::Tensor& buffer = *pair;
      TORCH_CHECK(buffer.dim() == 4 && buffer.size(0) == k.size(0) && buffer.size(1) == k.size(1) &&
                      buffer.size(3) == k.size(3) && buffer.size(2) >= end && buffer.scalar_type() == k.scalar_type(),
                  "run_blocks: the cache buffer of block ", i, " does not fit its keys/values");
    }
    keys[i].narrow(2, position, length).copy_(k);
    values[i].narrow(2, position, length).copy_(v);
    at::Tensor cached_keys = keys[i].narrow(2, 0, end), cached_values = values[i].narrow(2, 0, end);
    const auto& bias = biases[i];
    auto out = blocks[i]->out(h, q, cached_keys, cached_values, bias, causal && !bias.has_value());
    if (!out) return {h, i, Pending{q, cached_keys, cached_values}};
    h = std::move(*out);
  }
  return {h, n, std::nullopt};
}

}  // namespace

namespace qwen_kernels {

void bind_decode(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "DecodeLinear", "a linear layer of a DecodeBlock: kind 0 dense, 1 int8, 2 int4")
      .def(py::init(&make_linear), py::arg("kind"), py::arg("weight"), py::arg("scales") = py::none(),
           py::arg("mins") = py::none(), py::arg("bias") = py::none(), py::arg("group") = 0,
           py::arg("exact") = true);
  py::class_<DecodeBlock>(m, "DecodeBlock", "a QWenBlock's decode step in two calls (qkv, then out)")
      .def(py::init<at::Tensor, double, at::Tensor, double, Linear, Linear, Linear, Linear, Linear, int64_t, int64_t,
                    int64_t>(),
           py::arg("ln_1"), py::arg("eps_1"), py::arg("ln_2"), py::arg("eps_2"), py::arg("c_attn"),
           py::arg("attn_proj"), py::arg("w1"), py::arg("w2"), py::arg("mlp_proj"), py::arg("heads"),
           py::arg("head_dim"), py::arg("isa"))
      .def("qkv", &DecodeBlock::qkv, "(q, k, v) of the step, or None", py::arg("h"), py::arg("cos"), py::arg("sin"),
           py::call_guard<py::gil_scoped_release>())
      .def("out", &DecodeBlock::out, "the block's output, or None", py::arg("h"), py::arg("q"), py::arg("keys"),
           py::arg("values"), py::arg("bias"), py::arg("causal"), py::call_guard<py::gil_scoped_release>());
  m.def("run_blocks", &run_blocks, "consecutive blocks' decode steps, their keys and values stored in place",
        py::arg("blocks"), py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"),
        py::arg("position"), py::arg("biases"), py::arg("causal"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace qwen_kernels
