#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// "jit:avx512_core": sparse Linear in f32 on the AVX-512 JIT kernels.
implementation jit_avx512_linear_f32_implementation();
// "jit:avx2": the same on AVX2 + FMA, for CPUs without AVX-512.
implementation jit_avx2_linear_f32_implementation();
// "jit:avx512_core:pattern", "jit:avx2:pattern": forward and backward-data
// in code generated for the layer's pattern (spmm_runner.hpp), the same
// plan otherwise; the tuner measures them against the generic kernels.
implementation jit_avx512_pattern_linear_f32_implementation();
implementation jit_avx2_pattern_linear_f32_implementation();

} // namespace qsp::detail
