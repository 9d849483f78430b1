#pragma once

#include "primitives/core/implementation.hpp"
#include "primitives/sparse_jit/jit_implementation.hpp"

namespace qsp::detail {

// Sparse Linear in the s8 scheme on the JIT kernels of tier `isa`:
// avx512_core_vnni (vpdpbusd), avx512_core (AVX-512BW, exact nibble dot
// products) and avx2 (ymm, emulated dot products); "jit:<isa>" the generic
// kernels, "jit:<isa>:pattern" forward and backward-data in code generated
// for the layer's pattern (spmm_runner.hpp), measured against them.
implementation jit_linear_s8(cpu_isa isa, spmm_code code);

} // namespace qsp::detail
