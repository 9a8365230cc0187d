// megadeep._C: the op schemas (each backend registers its kernels in cpu/ and cuda/) and an empty
// Python module, so that `import megadeep._C` loads them into torch.ops.megadeep. Only torch/library.h
// and Python.h are included: torch/extension.h would quadruple the build time.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(megadeep, m) {
  // rstd is the per-row 1/sqrt(mean(x²)+eps) in the accumulation dtype, saved for the backward.
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_bwd(Tensor dout, Tensor gate_up) -> Tensor");
  // The same, with d(gate | up) written over gate_up.
  m.def("swiglu_bwd_(Tensor dout, Tensor(a!) gate_up) -> ()");
  // Rotary embedding, rotate-half layout, into a new contiguous tensor; backward=True applies its transpose.
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor");
  m.def("cuda_built() -> bool", []() -> bool {
#ifdef MEGADEEP_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "megadeep's csrc kernels: see torch.ops.megadeep", -1,
                             nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
