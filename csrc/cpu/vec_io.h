// Load and store any storage type as vectors of its accumulation type (float for bf16/fp16/fp32,
// double for fp64), so each CPU kernel is written once for every dtype.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>

namespace megadeep::cpu {

using at::vec::Vectorized;

template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;
  using Vec = Vectorized<acc_t>;
  // One step covers a whole Vectorized<T>: one acc vector for fp32/fp64, two for bf16/fp16.
  static constexpr int64_t kStep = Vectorized<T>::size();
  static constexpr int kParts = static_cast<int>(kStep / Vec::size());

  static inline void load(const T* p, Vec (&out)[kParts]) {
    if constexpr (kParts == 1) {
      out[0] = Vec::loadu(p);
    } else {
      static_assert(kParts == 2, "reduced types hold two float vectors");
      std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    }
  }

  // Vectors of the accumulation type itself (weights, partial sums), laid out like load().
  static inline void load_acc(const acc_t* p, Vec (&out)[kParts]) {
    for (int k = 0; k < kParts; ++k) out[k] = Vec::loadu(p + k * Vec::size());
  }

  static inline void store(T* p, const Vec (&in)[kParts]) {
    if constexpr (kParts == 1) {
      in[0].store(p);
    } else {
      at::vec::convert_from_float<T>(in[0], in[1]).store(p);
    }
  }

  // Sum of all lanes, in a fixed order.
  static inline acc_t sum(const Vec (&v)[kParts]) {
    Vec s = v[0];
    for (int k = 1; k < kParts; ++k) s = s + v[k];
    alignas(64) acc_t lanes[Vec::size()];
    s.store(lanes);
    acc_t out = 0;
    for (int64_t i = 0; i < Vec::size(); ++i) out += lanes[i];
    return out;
  }
};

// Elements per parallel chunk below which splitting costs more than it gains (ATen's own grain).
constexpr int64_t kGrain = 32768;

// Rows per parallel chunk so that each chunk holds about kGrain elements.
inline int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1)); }

}  // namespace megadeep::cpu
