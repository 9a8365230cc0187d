// Rotary position embedding on CPU, rotate-half layout (Hugging Face Llama's): for each head's row x of
// D = 2·half elements, y[:half] = x1·c1 − x2·s1 and y[half:] = x2·c2 + x1·s2; the backward applies the
// transpose, dx1 = dy1·c1 + dy2·s2 and dx2 = dy2·c2 − dy1·s1. One pass that reads x where it lies (q and
// k are strided views of the fused qkv projection) and writes a contiguous y, instead of eager
// PyTorch's chunk/neg/cat/mul/mul/add (five full-size temporaries each way). Math in the accumulation
// type, rounded once.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../ops.h"
#include "vec_io.h"

namespace megadeep::cpu {
namespace {

template <typename T, typename A = at::opmath_type<T>>
void rope_kernel(const T* x, const T* cos, const T* sin, T* y, const RopeDims& r, bool backward) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kStep = IO::kStep;
  constexpr int kParts = IO::kParts;
  const int64_t half = r.dim / 2, rows = r.batch * r.seq * r.heads;
  // forward: y1 = x1·c1 − x2·s1, y2 = x2·c2 + x1·s2; backward: the signs of the two sin terms swap
  // and so do the halves of sin they read.
  const A sign = backward ? A(-1) : A(1);
  at::parallel_for(0, rows, row_grain(r.dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % r.heads, s = (row / r.heads) % r.seq, b = row / (r.heads * r.seq);
      const T* xr = x + b * r.stride_batch + s * r.stride_seq + h * r.stride_head;
      const int64_t t = ((r.table_per_batch ? b : 0) * r.seq + s) * r.dim;
      const T *c1 = cos + t, *c2 = c1 + half;
      const T *s1 = sin + t + (backward ? half : 0), *s2 = sin + t + (backward ? 0 : half);
      T* yr = y + row * r.dim;
      int64_t j = 0;
      for (; j + kStep <= half; j += kStep) {
        Vec x1[kParts], x2[kParts], a[kParts], b1[kParts], c[kParts], d[kParts];
        IO::load(xr + j, x1);
        IO::load(xr + half + j, x2);
        IO::load(c1 + j, a);
        IO::load(s1 + j, b1);
        IO::load(c2 + j, c);
        IO::load(s2 + j, d);
        Vec o1[kParts], o2[kParts];
        for (int k = 0; k < kParts; ++k) {
          o1[k] = x1[k] * a[k] - Vec(sign) * x2[k] * b1[k];
          o2[k] = x2[k] * c[k] + Vec(sign) * x1[k] * d[k];
        }
        IO::store(yr + j, o1);
        IO::store(yr + half + j, o2);
      }
      for (; j < half; ++j) {
        const A x1 = A(xr[j]), x2 = A(xr[half + j]);
        yr[j] = T(x1 * A(c1[j]) - sign * x2 * A(s1[j]));
        yr[half + j] = T(x2 * A(c2[j]) + sign * x1 * A(s2[j]));
      }
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const RopeDims r = check_rope(x, cos, sin);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megadeep::rope", [&] {
    rope_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                          sin.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), r, backward);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(megadeep, CPU, m) { m.impl("rope", &rope); }

}  // namespace megadeep::cpu
