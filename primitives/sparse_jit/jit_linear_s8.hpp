#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// "jit:avx512_core_vnni": sparse Linear s8 backward-weights on VNNI.
implementation jit_avx512_vnni_linear_s8_implementation();
// "jit:avx512_core" for s8: the same kernels on AVX-512BW without VNNI
// (exact nibble dot products; selected only where it measures faster).
implementation jit_avx512_linear_s8_implementation();
// "jit:avx2" for s8: the same on AVX2 (ymm, emulated dot products).
implementation jit_avx2_linear_s8_implementation();

} // namespace qsp::detail
