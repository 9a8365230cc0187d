// Rotary position embedding on CUDA, rotate-half layout: one thread per (row, j < half) pair reads
// x1 = x[j], x2 = x[half + j] where they lie (strided q/k views) and writes both outputs, fp32 math.
// Forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2; backward (the transpose): y1 = x1·c1 + x2·s2,
// y2 = x2·c2 − x1·s1.
#include <algorithm>

#include "common.cuh"

namespace megadeep::cuda {
namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                            T* __restrict__ y, RopeDims r, bool backward) {
  const int64_t half = r.dim / 2, total = r.batch * r.seq * r.heads * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % half, row = i / half;
    const int64_t h = row % r.heads, s = (row / r.heads) % r.seq, b = row / (r.heads * r.seq);
    const T* xr = x + b * r.stride_batch + s * r.stride_seq + h * r.stride_head;
    const int64_t t = ((r.table_per_batch ? b : 0) * r.seq + s) * r.dim;
    const float x1 = to_float(xr[j]), x2 = to_float(xr[half + j]);
    const float c1 = to_float(cos[t + j]), c2 = to_float(cos[t + half + j]);
    const float s1 = to_float(sin[t + j]), s2 = to_float(sin[t + half + j]);
    T* yr = y + row * r.dim;
    yr[j] = from_float<T>(backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1);
    yr[half + j] = from_float<T>(backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2);
  }
}

}  // namespace

cudaError_t rope(DType dtype, const void* x, const void* cos, const void* sin, void* y, const RopeDims& r,
                 bool backward, cudaStream_t stream) {
  const int64_t total = r.batch * r.seq * r.heads * (r.dim / 2);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int grid = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 1 << 16));
  return dispatch(dtype, [&]<typename T>() {
    rope_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(cos),
                                                 static_cast<const T*>(sin), static_cast<T*>(y), r, backward);
    return cudaGetLastError();
  });
}

}  // namespace megadeep::cuda
