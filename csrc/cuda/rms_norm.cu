// RMSNorm on CUDA: one block per row, 16-byte vector loads, fp32 accumulation.
//
// The backward writes dx per row and accumulates dw in shared memory: each thread owns the same
// columns on every row, so no atomics are needed. Blocks take rows in a fixed stride and the
// per-block partial rows are summed in block order by a second kernel: dw is the same on every run.
#include <algorithm>

#include "common.cuh"

namespace megadeep::cuda {
namespace {

// Partial dw rows (and backward blocks): fixed by the row count alone, not by the device.
constexpr int64_t kMaxBwdBlocks = 512;

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32.
__device__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Weights are fp32: N of them as float4 loads when N is a multiple of 4 (16-byte aligned), else scalar.
template <int N>
__device__ __forceinline__ void load_w(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + k);
      out[k] = v.x, out[k + 1] = v.y, out[k + 2] = v.z, out[k + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = p[k];
  }
}

template <typename T, int N>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                    float* __restrict__ rstd, int64_t rows, int64_t hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    T* yr = y + row * hidden;
    float ss = 0.f;
    for (int64_t j = threadIdx.x * N; j < hidden; j += step) {
      float v[N];
      load<T, N>(xr + j, v);
#pragma unroll
      for (int k = 0; k < N; ++k) ss += v[k] * v[k];
    }
    const float rs = rsqrtf(block_sum(ss, scratch) / static_cast<float>(hidden) + eps);
    if (threadIdx.x == 0) rstd[row] = rs;
    for (int64_t j = threadIdx.x * N; j < hidden; j += step) {
      float v[N], wv[N];
      load<T, N>(xr + j, v);
      load_w<N>(w + j, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = v[k] * rs * wv[k];
      store<T, N>(yr + j, v);
    }
  }
}

template <typename T, int N>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ partial,
                                    int64_t rows, int64_t hidden) {
  extern __shared__ float dw_s[];  // hidden floats; element j belongs to the thread that loads column j
  __shared__ float scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t j = threadIdx.x * N; j < hidden; j += step) {
#pragma unroll
    for (int k = 0; k < N; ++k) dw_s[j + k] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * hidden;
    const T* xr = x + row * hidden;
    T* dxr = dx + row * hidden;
    float s = 0.f;  // Σ dy·w·x
    for (int64_t j = threadIdx.x * N; j < hidden; j += step) {
      float g[N], v[N], wv[N];
      load<T, N>(dyr + j, g);
      load<T, N>(xr + j, v);
      load_w<N>(w + j, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) s += g[k] * wv[k] * v[k];
    }
    s = block_sum(s, scratch);
    const float rs = rstd[row];
    const float c = rs * rs * rs * s / static_cast<float>(hidden);
    for (int64_t j = threadIdx.x * N; j < hidden; j += step) {
      float g[N], v[N], wv[N], out[N];
      load<T, N>(dyr + j, g);
      load<T, N>(xr + j, v);
      load_w<N>(w + j, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        out[k] = rs * g[k] * wv[k] - c * v[k];
        dw_s[j + k] += g[k] * v[k] * rs;
      }
      store<T, N>(dxr + j, out);
    }
  }
  float* mine = partial + blockIdx.x * hidden;
  for (int64_t j = threadIdx.x * N; j < hidden; j += step) {
#pragma unroll
    for (int k = 0; k < N; ++k) mine[j + k] = dw_s[j + k];
  }
}

// dw[j] = Σ_b partial[b][j], b in order.
__global__ void sum_partials_kernel(const float* __restrict__ partial, float* __restrict__ dw, int64_t blocks,
                                    int64_t hidden) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < hidden;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * hidden + j];
    dw[j] = s;
  }
}

// Threads per row: enough for one pack each, a multiple of 32, at most 512.
int threads_for(int64_t hidden, int n) {
  const int64_t packs = (hidden + n - 1) / n;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, (packs + 31) / 32 * 32)));
}

int grid_for(int64_t rows) { return static_cast<int>(std::min<int64_t>(rows, 1 << 20)); }

// The vector path needs whole packs per row and 16-byte aligned pointers; anything else runs scalar.
template <typename T>
bool vectorizable(int64_t hidden, std::initializer_list<const void*> ptrs) {
  if (hidden % kVec<T> != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

}  // namespace

cudaError_t rms_norm_fwd(DType dtype, const void* x, const float* w, void* y, float* rstd, int64_t rows,
                         int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch(dtype, [&]<typename T>() {
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    if (vectorizable<T>(hidden, {x, w, y})) {
      constexpr int N = kVec<T>;
      rms_norm_fwd_kernel<T, N><<<grid_for(rows), threads_for(hidden, N), 0, stream>>>(xt, w, yt, rstd, rows,
                                                                                         hidden, eps);
    } else {
      rms_norm_fwd_kernel<T, 1><<<grid_for(rows), threads_for(hidden, 1), 0, stream>>>(xt, w, yt, rstd, rows,
                                                                                         hidden, eps);
    }
    return cudaGetLastError();
  });
}

int64_t rms_norm_bwd_partials(int64_t rows) { return std::min(rows, kMaxBwdBlocks); }

cudaError_t rms_norm_bwd(DType dtype, const void* dy, const void* x, const float* w, const float* rstd, void* dx,
                         float* partial, float* dw, int64_t rows, int64_t hidden, cudaStream_t stream) {
  if (rows == 0) return cudaMemsetAsync(dw, 0, hidden * sizeof(float), stream);
  const int64_t blocks = rms_norm_bwd_partials(rows);
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  const cudaError_t status = dispatch(dtype, [&]<typename T>() {
    auto launch = [&]<int N>() {
      auto kernel = rms_norm_bwd_kernel<T, N>;
      if (smem > 48 * 1024) {  // above the default limit a kernel must opt in to more shared memory
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(smem));
        if (err != cudaSuccess) return err;
      }
      kernel<<<static_cast<int>(blocks), threads_for(hidden, N), smem, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), w, rstd, static_cast<T*>(dx), partial, rows, hidden);
      return cudaGetLastError();
    };
    return vectorizable<T>(hidden, {dy, x, w, dx}) ? launch.template operator()<kVec<T>>()
                                                     : launch.template operator()<1>();
  });
  if (status != cudaSuccess) return status;
  const int threads = 256;
  const int grid = static_cast<int>(std::min<int64_t>((hidden + threads - 1) / threads, 1024));
  sum_partials_kernel<<<grid, threads, 0, stream>>>(partial, dw, blocks, hidden);
  return cudaGetLastError();
}

}  // namespace megadeep::cuda
