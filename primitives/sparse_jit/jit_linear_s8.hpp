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
// ":pattern" (jit:avx512_core_vnni:pattern, jit:avx512_core:pattern,
// jit:avx2:pattern): forward and backward-data in code generated for the
// layer's pattern (spmm_runner.hpp); the tuner measures them against the
// generic kernels.
implementation jit_avx512_vnni_pattern_linear_s8_implementation();
implementation jit_avx512_pattern_linear_s8_implementation();
implementation jit_avx2_pattern_linear_s8_implementation();

} // namespace qsp::detail
