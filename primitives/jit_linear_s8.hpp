#pragma once

#include "primitives/primitive_impl.hpp"

namespace qsp::detail {

// "jit:avx512_core_vnni": sparse Linear s8 backward-weights on VNNI.
implementation jit_avx512_vnni_linear_s8_implementation();

} // namespace qsp::detail
