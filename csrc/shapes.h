// Operand shapes that both the torch-side checks (ops.h) and the torch-free CUDA launchers (cuda/kernels.h)
// speak: plain structs, no torch or CUDA headers.
#pragma once

#include <cstdint>

namespace megadeep {

// rope: x is [batch, seq, heads, dim] at these element strides (unit stride along dim: q and k are views
// of the fused qkv output); cos and sin are contiguous [batch or 1, seq, dim] tables in x's dtype; the
// output is contiguous like x.
struct RopeDims {
  int64_t batch, seq, heads, dim, stride_batch, stride_seq, stride_head;
  bool table_per_batch;
};

}  // namespace megadeep
