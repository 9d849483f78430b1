#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// Sparse Conv2d on the JIT kernels, batch-innermost (conv_layout.hpp):
// "jit:avx512_core" / "jit:avx2" in f32, "jit:avx512_core_vnni" /
// "jit:avx512_core" / "jit:avx2" in s8 (exact int8 dot products on every
// tier), any stride, padding, dilation and groups.
implementation jit_avx512_conv2d_f32_implementation();
implementation jit_avx2_conv2d_f32_implementation();
implementation jit_avx512_vnni_conv2d_s8_implementation();
implementation jit_avx512_conv2d_s8_implementation();
implementation jit_avx2_conv2d_s8_implementation();

} // namespace qsp::detail
