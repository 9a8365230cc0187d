// SwiGLU on CPU, on the fused [..., gate | up] layout: out = silu(gate) · up.
//
// Forward reads gate and up once and writes out; backward reads gate, up and dout once and writes
// d(gate | up) in the same fused layout, so no chunk/cat copies are made on either side; swiglu_bwd_
// writes it over gate_up itself, for callers that no longer need gate_up (no new tensor to page in). Both are
// bound by exp as much as by memory on 2 AVX2 cores, so sigmoid uses ATen's polynomial exp_u20
// (within 2e-7 relative of Sleef's exp, 1.5× faster; plain exp for fp64).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"
#include "vec_io.h"

namespace megadeep::cpu {
namespace {

// Calls f(row, first column, column count) for each row piece of the flat range [begin, end) of a
// rows × width matrix, so a parallel chunk may start and end inside a row (one huge row still splits).
template <typename F>
inline void for_row_pieces(int64_t begin, int64_t end, int64_t width, const F& f) {
  while (begin < end) {
    const int64_t row = begin / width, col = begin % width;
    const int64_t n = std::min(width - col, end - begin);
    f(row, col, n);
    begin += n;
  }
}

// Runs piece(gate, up, row, first column, column count) over the [gate | up] rows in parallel.
template <typename T, typename F>
inline void over_gate_up(const T* gate_up, int64_t rows, int64_t width, const F& piece) {
  at::parallel_for(0, rows * width, kGrain, [&](int64_t begin, int64_t end) {
    for_row_pieces(begin, end, width, [&](int64_t r, int64_t c0, int64_t n) {
      const T* g = gate_up + r * 2 * width + c0;
      piece(g, g + width, r, c0, n);
    });
  });
}

template <typename A>
inline A sigmoid(A g) {
  return A(1) / (A(1) + std::exp(-g));
}

template <typename T, typename A = at::opmath_type<T>>
void swiglu_fwd_kernel(const T* gate_up, T* out, int64_t rows, int64_t width) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = IO::kStep;
  constexpr int kParts = IO::kParts;
  const Vec one(A(1));
  over_gate_up(gate_up, rows, width, [&](const T* g, const T* u, int64_t r, int64_t c0, int64_t n) {
    T* o = out + r * width + c0;
    int64_t j = 0;
    for (; j + kStep <= n; j += kStep) {
      Vec gv[kParts], uv[kParts];
      IO::load(g + j, gv);
      IO::load(u + j, uv);
      for (int k = 0; k < kParts; ++k) gv[k] = gv[k] / (one + gv[k].neg().exp_u20()) * uv[k];
      IO::store(o + j, gv);
    }
    for (; j < n; ++j) {
      const A gj = A(g[j]);
      o[j] = T(gj * sigmoid(gj) * A(u[j]));
    }
  });
}

template <typename T, typename A = at::opmath_type<T>>
void swiglu_bwd_kernel(const T* dout, const T* gate_up, T* dgate_up, int64_t rows, int64_t width) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = IO::kStep;
  constexpr int kParts = IO::kParts;
  const Vec one(A(1));
  over_gate_up(gate_up, rows, width, [&](const T* g, const T* u, int64_t r, int64_t c0, int64_t n) {
    const T* d = dout + r * width + c0;
    T* dg = dgate_up + r * 2 * width + c0;
    T* du = dg + width;
    int64_t j = 0;
    for (; j + kStep <= n; j += kStep) {
      Vec gv[kParts], uv[kParts], dv[kParts], dgv[kParts], duv[kParts];
      IO::load(g + j, gv);
      IO::load(u + j, uv);
      IO::load(d + j, dv);
      for (int k = 0; k < kParts; ++k) {
        // silu'(g) = s·(1 + g·(1 − s)) with s = sigmoid(g)
        const Vec s = one / (one + gv[k].neg().exp_u20());
        const Vec silu = gv[k] * s;
        duv[k] = dv[k] * silu;
        dgv[k] = dv[k] * uv[k] * (s * (one + gv[k] * (one - s)));
      }
      IO::store(dg + j, dgv);
      IO::store(du + j, duv);
    }
    for (; j < n; ++j) {
      const A gj = A(g[j]), uj = A(u[j]), dj = A(d[j]);  // all read before writing: dgate_up may be gate_up
      const A s = sigmoid(gj);
      du[j] = T(dj * (gj * s));
      dg[j] = T(dj * uj * (s * (A(1) + gj * (A(1) - s))));
    }
  });
}

at::Tensor swiglu_fwd(const at::Tensor& gate_up) {
  const auto [rows, width] = check_swiglu(gate_up);
  at::Tensor out = at::empty(half_last(gate_up), gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "megadeep::swiglu_fwd", [&] {
    swiglu_fwd_kernel<scalar_t>(gate_up.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, width);
  });
  return out;
}

// dgate_up may be gate_up itself: every element is read before it is written.
void swiglu_bwd_into(const at::Tensor& dout, const at::Tensor& gate_up, const at::Tensor& dgate_up) {
  const auto [rows, width] = check_swiglu(gate_up);
  check_grad(dout, half_last(gate_up), gate_up, "swiglu backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "megadeep::swiglu_bwd", [&] {
    swiglu_bwd_kernel<scalar_t>(dout.const_data_ptr<scalar_t>(), gate_up.const_data_ptr<scalar_t>(),
                                dgate_up.mutable_data_ptr<scalar_t>(), rows, width);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(megadeep, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd_new<swiglu_bwd_into>);
  m.impl("swiglu_bwd_", &swiglu_bwd_inplace<swiglu_bwd_into>);
}

}  // namespace megadeep::cpu
