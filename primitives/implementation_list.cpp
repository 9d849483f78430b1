// The ordered list of implementations, the one place a new kernel family is
// registered (XNNPACK-style): faster ones first, the reference last. The
// first whose why_not() is empty wins; QSP_VERBOSE=dispatch prints the rest.
#include "primitives/dense_s8_linear.hpp"
#include "primitives/jit_linear_f32.hpp"
#include "primitives/jit_linear_s8.hpp"
#include "primitives/primitive_impl.hpp"
#include "primitives/ref/ref_implementation.hpp"

namespace qsp::detail {

const std::vector<implementation> &implementation_list() {
    // clang-format off
    static const std::vector<implementation> list = {
        jit_avx512_linear_f32_implementation(),
        jit_avx2_linear_f32_implementation(),
        jit_avx512_vnni_linear_s8_implementation(),
        jit_avx512_linear_s8_implementation(),
        jit_avx2_linear_s8_implementation(),
        dense_onednn_s8_linear_implementation(),
        ref_implementation(),
    };
    // clang-format on
    return list;
}

} // namespace qsp::detail
