// RMSNorm on CPU: y = x · rsqrt(mean(x²) + eps) · w, over the last dimension.
//
// Forward reads x once from memory (the row stays in cache for the second pass) and writes y and the
// per-row rstd. Backward reads dy and x once, writes dx, and accumulates dw into one partial row per
// block of rows; blocks are fixed by the row count alone and summed in block order, so dw is the same
// on every run and for any thread count.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <memory>

#include "../ops.h"
#include "vec_io.h"

namespace megadeep::cpu {
namespace {

template <typename T, typename A = at::opmath_type<T>>
void rms_norm_fwd_kernel(const T* x, const A* w, T* y, A* rstd, int64_t rows, int64_t hidden, A eps) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = IO::kStep;
  constexpr int kParts = IO::kParts;
  const int64_t body = hidden - hidden % kStep;
  at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      T* yr = y + r * hidden;
      Vec sq[kParts];
      for (auto& v : sq) v = Vec(A(0));
      for (int64_t j = 0; j < body; j += kStep) {
        Vec v[kParts];
        IO::load(xr + j, v);
        for (int k = 0; k < kParts; ++k) sq[k] = at::vec::fmadd(v[k], v[k], sq[k]);
      }
      A ss = IO::sum(sq);
      for (int64_t j = body; j < hidden; ++j) ss += A(xr[j]) * A(xr[j]);
      const A rs = A(1) / std::sqrt(ss / A(hidden) + eps);
      rstd[r] = rs;
      const Vec vrs(rs);
      for (int64_t j = 0; j < body; j += kStep) {
        Vec v[kParts], wv[kParts];
        IO::load(xr + j, v);
        IO::load_acc(w + j, wv);
        for (int k = 0; k < kParts; ++k) v[k] = v[k] * vrs * wv[k];
        IO::store(yr + j, v);
      }
      for (int64_t j = body; j < hidden; ++j) yr[j] = T(A(xr[j]) * rs * w[j]);
    }
  });
}

// Partial dw rows: at most this many, so the final sum is short and the order never depends on threads,
// and at least this many rows each, so small batches do not pay for (page-faulting) scratch they barely use.
constexpr int64_t kMaxDwBlocks = 64;
constexpr int64_t kMinDwRows = 16;

template <typename T, typename A = at::opmath_type<T>>
void rms_norm_bwd_kernel(const T* dy, const T* x, const A* w, const A* rstd, T* dx, A* dw, int64_t rows,
                         int64_t hidden) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = IO::kStep;
  constexpr int kParts = IO::kParts;
  const int64_t body = hidden - hidden % kStep;
  const int64_t per_block = std::max(kMinDwRows, (rows + kMaxDwBlocks - 1) / kMaxDwBlocks);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  // Uninitialised: each block zeroes (first-touches) its own row inside the parallel loop.
  std::unique_ptr<A[]> partial(new A[blocks * hidden]);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      A* dwp = partial.get() + b * hidden;
      std::fill(dwp, dwp + hidden, A(0));
      for (int64_t r = b * per_block; r < std::min(rows, (b + 1) * per_block); ++r) {
        const T* dyr = dy + r * hidden;
        const T* xr = x + r * hidden;
        T* dxr = dx + r * hidden;
        // s = Σ dy·w·x, then dx = rstd·dy·w − (rstd³·s/hidden)·x and dw += dy·x·rstd.
        Vec dot[kParts];
        for (auto& v : dot) v = Vec(A(0));
        for (int64_t j = 0; j < body; j += kStep) {
          Vec g[kParts], v[kParts], wv[kParts];
          IO::load(dyr + j, g);
          IO::load(xr + j, v);
          IO::load_acc(w + j, wv);
          for (int k = 0; k < kParts; ++k) dot[k] = at::vec::fmadd(g[k] * wv[k], v[k], dot[k]);
        }
        A s = IO::sum(dot);
        for (int64_t j = body; j < hidden; ++j) s += A(dyr[j]) * w[j] * A(xr[j]);
        const A rs = rstd[r];
        const A c = rs * rs * rs * s / A(hidden);
        const Vec vrs(rs), vc(c);
        for (int64_t j = 0; j < body; j += kStep) {
          Vec g[kParts], v[kParts], wv[kParts], out[kParts], acc[kParts];
          IO::load(dyr + j, g);
          IO::load(xr + j, v);
          IO::load_acc(w + j, wv);
          IO::load_acc(dwp + j, acc);
          for (int k = 0; k < kParts; ++k) {
            out[k] = vrs * g[k] * wv[k] - vc * v[k];
            acc[k] = at::vec::fmadd(g[k] * v[k], vrs, acc[k]);
            acc[k].store(dwp + j + k * Vec::size());
          }
          IO::store(dxr + j, out);
        }
        for (int64_t j = body; j < hidden; ++j) {
          const A g = A(dyr[j]), v = A(xr[j]);
          dxr[j] = T(rs * g * w[j] - c * v);
          dwp[j] += g * v * rs;
        }
      }
    }
  });
  at::parallel_for(0, hidden, kGrain / std::max<int64_t>(blocks, 1), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A s = 0;
      for (int64_t b = 0; b < blocks; ++b) s += partial[b * hidden + c];
      dw[c] = s;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const RmsNormFwd o = rms_norm_fwd_setup(x, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megadeep::rms_norm_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    rms_norm_fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), o.w.const_data_ptr<A>(),
                                  o.y.mutable_data_ptr<scalar_t>(), o.rstd.mutable_data_ptr<A>(), o.rows, o.hidden,
                                  static_cast<A>(eps));
  });
  return {o.y, o.rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rstd) {
  const RmsNormBwd o = rms_norm_bwd_setup(dy, x, weight, rstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megadeep::rms_norm_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    rms_norm_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), o.w.const_data_ptr<A>(),
                                  rstd.const_data_ptr<A>(), o.dx.mutable_data_ptr<scalar_t>(),
                                  o.dw.mutable_data_ptr<A>(), o.rows, o.hidden);
  });
  return {o.dx, o.dw.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(megadeep, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace megadeep::cpu
