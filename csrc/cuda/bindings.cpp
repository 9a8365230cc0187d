// Binds the torch-free CUDA launchers (kernels.h) to tensors for torch.ops.megadeep. Compiled only when
// torch has CUDA. Weights are handed to the kernels in fp32 and dw comes back in the weight's dtype.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

// The bindings live outside megadeep::cuda so that their names do not overload the launchers'.
namespace megadeep {
namespace {

using cuda::DType;

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
  const DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const RmsNormFwd o = rms_norm_fwd_setup(x, weight);
  check_launch(cuda::rms_norm_fwd(dtype, x.const_data_ptr(), o.w.const_data_ptr<float>(), o.y.mutable_data_ptr(),
                                  o.rstd.mutable_data_ptr<float>(), o.rows, o.hidden, static_cast<float>(eps),
                                  c10::cuda::getCurrentCUDAStream()),
               "rms_norm forward");
  return {o.y, o.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  const DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const RmsNormBwd o = rms_norm_bwd_setup(dy, x, weight, rstd);
  at::Tensor partial = at::empty({cuda::rms_norm_bwd_partials(o.rows), o.hidden}, x.options().dtype(at::kFloat));
  check_launch(cuda::rms_norm_bwd(dtype, dy.const_data_ptr(), x.const_data_ptr(), o.w.const_data_ptr<float>(),
                                  rstd.const_data_ptr<float>(), o.dx.mutable_data_ptr(),
                                  partial.mutable_data_ptr<float>(), o.dw.mutable_data_ptr<float>(), o.rows, o.hidden,
                                  c10::cuda::getCurrentCUDAStream()),
               "rms_norm backward (hidden sizes whose fp32 row exceeds the GPU's shared memory are not supported)");
  return {o.dx, o.dw.to(weight.scalar_type())};
}

at::Tensor swiglu_fwd(const at::Tensor& gate_up) {
  const auto [rows, width] = check_swiglu(gate_up);
  const DType dtype = dtype_of(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  at::Tensor out = at::empty(half_last(gate_up), gate_up.options());
  check_launch(cuda::swiglu_fwd(dtype, gate_up.const_data_ptr(), out.mutable_data_ptr(), rows, width,
                                c10::cuda::getCurrentCUDAStream()),
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
                                rows, width, c10::cuda::getCurrentCUDAStream()),
               "swiglu backward");
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const RopeDims r = check_rope(x, cos, sin);
  const DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(cuda::rope(dtype, x.const_data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(), y.mutable_data_ptr(),
                          r, backward, c10::cuda::getCurrentCUDAStream()),
               "rope");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(megadeep, CUDA, m) {
  m.impl("rope", &rope);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd_new<swiglu_bwd_into>);
  m.impl("swiglu_bwd_", &swiglu_bwd_inplace<swiglu_bwd_into>);
}

}  // namespace megadeep
