// What every backend does around its kernels: the same checks (so CPU and CUDA refuse the same inputs
// with the same message) and the same outputs. Kernels need contiguous rows; megadeep.ops makes
// inputs contiguous.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <vector>

#include "shapes.h"

namespace megadeep {

// A contiguous input seen as `rows` rows of `len` elements.
struct Rows {
  int64_t rows, len;
};

// x as rows of its hidden size, checked against the weight.
inline Rows check_rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dimension");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden > 0, "rms_norm: the last dimension of x is empty");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "rms_norm: weight has shape ", weight.sizes(),
              " but x has hidden size ", hidden);
  TORCH_CHECK(x.is_contiguous(), "rms_norm: x must be contiguous (megadeep.ops.rms_norm makes it so)");
  TORCH_CHECK(weight.device() == x.device(), "rms_norm: x is on ", x.device(), " but weight on ", weight.device());
  return {x.numel() / hidden, hidden};
}

// gate_up as rows whose `len` is the width of one half (gate or up) of the fused [..., gate | up] layout.
inline Rows check_swiglu(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "swiglu: the last dimension of gate_up must be even ([..., gate | up]), got shape ", gate_up.sizes());
  TORCH_CHECK(gate_up.is_contiguous(), "swiglu: gate_up must be contiguous (megadeep.ops.swiglu makes it so)");
  const int64_t width = gate_up.size(-1) / 2;
  return {width ? gate_up.numel() / (2 * width) : 0, width};
}

// Output shape of swiglu: gate_up's shape with the last dimension halved.
inline std::vector<int64_t> half_last(const at::Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

// rope's operands (RopeDims, shapes.h), checked.
inline RopeDims check_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4, "rope: x must be [batch, seq, heads, head_dim], got shape ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, "rope: head_dim must be even, got ", x.size(3));
  TORCH_CHECK(x.stride(3) == 1 || x.size(3) <= 1, "rope: x must have unit stride along head_dim");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == 1 || cos.size(0) == x.size(0)) &&
                  cos.size(1) == x.size(1) && cos.size(2) == x.size(3),
              "rope: cos and sin must be [1 or batch, seq, head_dim] for x of shape ", x.sizes(), ", got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "rope: cos and sin must be contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos and sin must have x's dtype ", x.scalar_type());
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), "rope: x is on ", x.device(),
              " but the tables on ", cos.device());
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), cos.size(0) > 1};
}

// A gradient must look like the tensor it belongs to (shape, dtype, device) and be contiguous.
inline void check_grad(const at::Tensor& grad, at::IntArrayRef shape, const at::Tensor& like, const char* what) {
  TORCH_CHECK(grad.sizes() == shape && grad.scalar_type() == like.scalar_type() && grad.device() == like.device(),
              what, ": gradient is ", grad.sizes(), " ", grad.scalar_type(), " on ", grad.device(), ", expected ", shape,
              " ", like.scalar_type(), " on ", like.device());
  TORCH_CHECK(grad.is_contiguous(), what, ": gradient must be contiguous");
}

// Checks the forward's row statistics handed back to the backward.
inline void check_rstd(const at::Tensor& rstd, const at::Tensor& x, int64_t rows) {
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == acc && rstd.numel() == rows && rstd.is_contiguous() && rstd.device() == x.device(),
              "rms_norm backward: rstd must be the forward's contiguous ", acc, " row statistics");
}

// An rms_norm kernel's operands: checked sizes, the weight in the accumulation dtype (float, or
// double for fp64) and the outputs, allocated. The weight gradient goes back as dw.to(weight dtype).
struct RmsNormFwd {
  int64_t rows, hidden;
  at::Tensor w, y, rstd;
};

inline RmsNormFwd rms_norm_fwd_setup(const at::Tensor& x, const at::Tensor& weight) {
  const auto [rows, hidden] = check_rms_norm(x, weight);
  const auto acc = at::toOpMathType(x.scalar_type());
  return {rows, hidden, weight.to(acc).contiguous(), at::empty_like(x),
          at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc))};
}

struct RmsNormBwd {
  int64_t rows, hidden;
  at::Tensor w, dx, dw;
};

inline RmsNormBwd rms_norm_bwd_setup(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& rstd) {
  const auto [rows, hidden] = check_rms_norm(x, weight);
  check_grad(dy, x.sizes(), x, "rms_norm backward");
  check_rstd(rstd, x, rows);
  const auto acc = rstd.scalar_type();
  return {rows, hidden, weight.to(acc).contiguous(), at::empty_like(x), at::empty({hidden}, x.options().dtype(acc))};
}

// The two swiglu backward ops over a backend's into(dout, gate_up, dgate_up): into a new tensor
// (swiglu_bwd) or over gate_up itself (swiglu_bwd_).
using SwigluBwdInto = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <SwigluBwdInto into>
at::Tensor swiglu_bwd_new(const at::Tensor& dout, const at::Tensor& gate_up) {
  at::Tensor dgate_up = at::empty_like(gate_up);
  into(dout, gate_up, dgate_up);
  return dgate_up;
}

template <SwigluBwdInto into>
void swiglu_bwd_inplace(const at::Tensor& dout, const at::Tensor& gate_up) {
  into(dout, gate_up, gate_up);
}

}  // namespace megadeep
