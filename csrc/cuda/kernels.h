// Launchers for megadeep's CUDA kernels. Torch-free on purpose: raw pointers, a dtype tag and a stream,
// so the .cu files compile with nothing but the CUDA toolkit (also on machines whose torch has no CUDA).
// Every launcher returns the launch status; bindings.cpp turns errors into exceptions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../shapes.h"

namespace megadeep::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// x, y: rows × hidden in `dtype`; w: hidden floats; rstd: rows floats (written).
cudaError_t rms_norm_fwd(DType dtype, const void* x, const float* w, void* y, float* rstd, int64_t rows,
                         int64_t hidden, float eps, cudaStream_t stream);

// Rows of float workspace the backward needs for its partial dw sums (hidden floats each).
int64_t rms_norm_bwd_partials(int64_t rows);

// dy, x, dx: rows × hidden in `dtype`; w, dw: hidden floats; partial: rms_norm_bwd_partials(rows) × hidden
// floats of scratch. dw is the sum of the partial rows in a fixed order: the same on every run.
cudaError_t rms_norm_bwd(DType dtype, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                         float* partial, float* dw, int64_t rows, int64_t hidden, cudaStream_t stream);

// gate_up: rows × 2·width ([gate | up]); out: rows × width; dgate_up like gate_up, and may be gate_up.
cudaError_t swiglu_fwd(DType dtype, const void* gate_up, void* out, int64_t rows, int64_t width, cudaStream_t stream);
cudaError_t swiglu_bwd(DType dtype, const void* dout, const void* gate_up, void* dgate_up, int64_t rows,
                       int64_t width, cudaStream_t stream);

// x, cos, sin, y: see RopeDims (shapes.h).
cudaError_t rope(DType dtype, const void* x, const void* cos, const void* sin, void* y, const RopeDims& r,
                 bool backward, cudaStream_t stream);

}  // namespace megadeep::cuda
