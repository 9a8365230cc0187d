// SwiGLU on CUDA on the fused [..., gate | up] layout: out = silu(gate) · up, elementwise with 16-byte
// vector loads and fp32 math. The backward writes d(gate | up) in the same layout (no chunk/cat copies).
#include <algorithm>

#include "common.cuh"

namespace megadeep::cuda {
namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// Visits each pack of N columns of a rows × width matrix: f(row, first column), grid-stride.
template <int N, typename F>
__device__ __forceinline__ void for_each_pack(int64_t rows, int64_t width, F&& f) {
  const int64_t per_row = width / N, total = rows * per_row;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    f(p / per_row, (p % per_row) * N);
  }
}

template <typename T, int N>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t rows, int64_t width) {
  for_each_pack<N>(rows, width, [&](int64_t r, int64_t c) {
    const T* g = gate_up + r * 2 * width + c;
    float gv[N], uv[N];
    load<T, N>(g, gv);
    load<T, N>(g + width, uv);
#pragma unroll
    for (int k = 0; k < N; ++k) gv[k] = gv[k] * sigmoid(gv[k]) * uv[k];
    store<T, N>(out + r * width + c, gv);
  });
}

// dgate_up may alias gate_up (no __restrict__ on them): each pack is loaded before it is stored.
template <typename T, int N>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* gate_up, T* dgate_up, int64_t rows,
                                  int64_t width) {
  for_each_pack<N>(rows, width, [&](int64_t r, int64_t c) {
    const T* g = gate_up + r * 2 * width + c;
    T* dg = dgate_up + r * 2 * width + c;
    float gv[N], uv[N], dv[N], dgv[N], duv[N];
    load<T, N>(g, gv);
    load<T, N>(g + width, uv);
    load<T, N>(dout + r * width + c, dv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float s = sigmoid(gv[k]);
      duv[k] = dv[k] * (gv[k] * s);
      dgv[k] = dv[k] * uv[k] * (s * (1.f + gv[k] * (1.f - s)));  // silu'(g) = s·(1 + g·(1 − s))
    }
    store<T, N>(dg, dgv);
    store<T, N>(dg + width, duv);
  });
}

template <typename T, typename Launch>
cudaError_t launch_packs(int64_t rows, int64_t width, std::initializer_list<const void*> ptrs, Launch&& launch) {
  if (rows == 0 || width == 0) return cudaSuccess;
  bool vec = width % kVec<T> == 0;
  for (const void* p : ptrs) vec = vec && aligned16(p);
  const int n = vec ? kVec<T> : 1;
  const int threads = 256;
  const int64_t packs = rows * (width / n);
  const int grid = static_cast<int>(std::min<int64_t>((packs + threads - 1) / threads, 1 << 16));
  if (vec) {
    launch.template operator()<kVec<T>>(grid, threads);
  } else {
    launch.template operator()<1>(grid, threads);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_fwd(DType dtype, const void* gate_up, void* out, int64_t rows, int64_t width, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    return launch_packs<T>(rows, width, {gate_up, out}, [&]<int N>(int grid, int threads) {
      swiglu_fwd_kernel<T, N><<<grid, threads, 0, stream>>>(static_cast<const T*>(gate_up), static_cast<T*>(out),
                                                            rows, width);
    });
  });
}

cudaError_t swiglu_bwd(DType dtype, const void* dout, const void* gate_up, void* dgate_up, int64_t rows,
                       int64_t width, cudaStream_t stream) {
  return dispatch(dtype, [&]<typename T>() {
    return launch_packs<T>(rows, width, {dout, gate_up, dgate_up}, [&]<int N>(int grid, int threads) {
      swiglu_bwd_kernel<T, N><<<grid, threads, 0, stream>>>(
          static_cast<const T*>(dout), static_cast<const T*>(gate_up), static_cast<T*>(dgate_up), rows, width);
    });
  });
}

}  // namespace megadeep::cuda
