#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// Sparse Conv2d on the JIT kernels, two vectorizations of every tier (f32:
// avx512_core, avx2; s8: avx512_core_vnni, avx512_core, avx2, exact int8 dot
// products everywhere), any stride, padding, dilation and groups:
//   "jit:<isa>:batch"  batch-innermost tiles (conv_layout.hpp)
//   "jit:<isa>:width"  output-width-innermost planes (conv_width.hpp)
implementation jit_avx512_conv2d_f32_implementation();
implementation jit_avx2_conv2d_f32_implementation();
implementation jit_avx512_vnni_conv2d_s8_implementation();
implementation jit_avx512_conv2d_s8_implementation();
implementation jit_avx2_conv2d_s8_implementation();
implementation jit_avx512_conv2d_width_f32_implementation();
implementation jit_avx2_conv2d_width_f32_implementation();
implementation jit_avx512_vnni_conv2d_width_s8_implementation();
implementation jit_avx512_conv2d_width_s8_implementation();
implementation jit_avx2_conv2d_width_s8_implementation();

} // namespace qsp::detail
