// Binds the torch-free CUDA launchers (kernels.h) to tensors for torch.ops.megadeep. Compiled only when
// torch has CUDA. Weights are handed to the kernels in fp32 and dw comes back in the weight's dtype.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace megadeep::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "megadeep's CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "megadeep ", what, " failed to launch: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto [rows, hidden] = check_rms_norm(x, weight);
  const DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  check_launch(cuda::rms_norm_fwd(dtype, x.const_data_ptr(), w.const_data_ptr<float>(), y.mutable_data_ptr(),
                                  rstd.mutable_data_ptr<float>(), rows, hidden, static_cast<float>(eps),
                                  at::cuda::getCurrentCUDAStream()),
               "rms_norm forward");
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  const auto [rows, hidden] = check_rms_norm(x, weight);
  check_grad(dy, x.sizes(), x, "rms_norm backward");
  check_rstd(rstd, x, rows);
  const DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({hidden}, x.options().dtype(at::kFloat));
  at::Tensor partial = at::empty({cuda::rms_norm_bwd_partials(rows), hidden}, x.options().dtype(at::kFloat));
  check_launch(cuda::rms_norm_bwd(dtype, dy.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr<float>(),
                                  rstd.const_data_ptr<float>(), dx.mutable_data_ptr(), partial.mutable_data_ptr<float>(),
                                  dw.mutable_data_ptr<float>(), rows, hidden, at::cuda::getCurrentCUDAStream()),
               "rms_norm backward (hidden sizes whose fp32 row exceeds the GPU's shared memory are not supported)");
  return {dx, dw.to(weight.scalar_type())};
}

at::Tensor swiglu_fwd(const at::Tensor& gate_up) {
  const auto [rows, width] = check_swiglu(gate_up);
  const DType dtype = dtype_of(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  at::Tensor out = at::empty(half_last(gate_up), gate_up.options());
  check_launch(cuda::swiglu_fwd(dtype, gate_up.const_data_ptr(), out.mutable_data_ptr(), rows, width,
                                at::cuda::getCurrentCUDAStream()),
               "swiglu forward");
  return out;
}

// dgate_up may be gate_up itself (swiglu_bwd_): each thread reads its pack before writing it.
void swiglu_bwd_into(const at::Tensor& dout, const at::Tensor& gate_up, const at::Tensor& dgate_up) {
  const auto [rows, width] = check_swiglu(gate_up);
  check_grad(dout, half_last(gate_up), gate_up, "swiglu backward");
  const DType dtype = dtype_of(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  check_launch(cuda::swiglu_bwd(dtype, dout.const_data_ptr(), gate_up.const_data_ptr(), dgate_up.mutable_data_ptr(),
                                rows, width, at::cuda::getCurrentCUDAStream()),
               "swiglu backward");
}

at::Tensor swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate_up) {
  at::Tensor dgate_up = at::empty_like(gate_up);
  swiglu_bwd_into(dout, gate_up, dgate_up);
  return dgate_up;
}

void swiglu_bwd_(const at::Tensor& dout, const at::Tensor& gate_up) { swiglu_bwd_into(dout, gate_up, gate_up); }

}  // namespace

TORCH_LIBRARY_IMPL(megadeep, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_bwd_", &swiglu_bwd_);
}

}  // namespace megadeep::cuda
