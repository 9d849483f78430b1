#pragma once

#include "primitives/core/implementation.hpp"
#include "primitives/sparse_jit/jit_implementation.hpp"

namespace qsp::detail {

// Sparse Linear in f32 on the JIT kernels of tier `isa` (avx512_core, avx2):
// "jit:<isa>" runs the generic kernels, "jit:<isa>:pattern" forward and
// backward-data in code generated for the layer's pattern (spmm_runner.hpp),
// the same plan otherwise; the tuner measures them against each other.
implementation jit_linear_f32(cpu_isa isa, spmm_code code);

} // namespace qsp::detail
