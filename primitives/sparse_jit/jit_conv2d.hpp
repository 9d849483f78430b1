#pragma once

#include "primitives/core/implementation.hpp"
#include "primitives/sparse_jit/jit_implementation.hpp"

namespace qsp::detail {

// Sparse Conv2d on the JIT kernels of tier `isa` (f32: avx512_core, avx2; s8:
// avx512_core_vnni, avx512_core, avx2, exact int8 dot products everywhere),
// any stride, padding, dilation and groups, in two vectorizations:
//   "jit:<isa>:batch"  batch-innermost tiles (conv_layout.hpp)
//   "jit:<isa>:width"  output-width-innermost planes (conv_width.hpp)
implementation jit_conv2d_batch(quant_scheme scheme, cpu_isa isa);
implementation jit_conv2d_width(quant_scheme scheme, cpu_isa isa);

// For tests: how many width-kernel runs of `dir` so far took the flat form
// on narrow rows at stride 1 (an image's output rows as one kernel row):
// the SpMM's (forward, backward-data) and the f32 SDDMM's (backward-weights;
// the s8 SDDMM's, flat at every stride-1 width, are not counted).
int64_t flat_width_runs_for_testing(direction dir);

} // namespace qsp::detail
