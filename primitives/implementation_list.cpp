// The ordered list of implementations, the one place a new kernel family is
// registered (XNNPACK-style) and the only file of primitives/ that names
// implementation families: the core walks the list without knowing them.
// Order = expectation, best first; the first that accepts a problem is
// picked unless the tuner stored another decision (qsparseprop/tuning.hpp);
// the reference, which accepts everything, is last.
#include "primitives/core/implementation.hpp"
#include "primitives/dense_onednn/dense_s8_conv2d.hpp"
#include "primitives/dense_onednn/dense_s8_linear.hpp"
#include "primitives/ref/dense_semantics.hpp"
#include "primitives/ref/ref_implementation.hpp"
#include "primitives/sparse_jit/jit_conv2d.hpp"
#include "primitives/sparse_jit/jit_linear_f32.hpp"
#include "primitives/sparse_jit/jit_linear_s8.hpp"

namespace qsp::detail {

namespace {

// f32 layers must behave like dense torch on NaN/Inf inputs, whichever
// implementation runs them: the guard takes the rare calls that need it.
implementation with_dense_semantics(implementation impl) {
    auto create = impl.create;
    impl.create = [create](const problem &p) { return with_dense_semantics(p, create(p)); };
    return impl;
}

} // namespace

const std::vector<implementation> &implementation_list() {
    // clang-format off
    static const std::vector<implementation> list = {
        // Linear: the layer's specialised code first (measured faster on
        // L1-L4 at every sparsity, docs/benchmarks.md); backward-weights
        // has no such form and takes the generic kernels next in line.
        with_dense_semantics(jit_linear_f32(cpu_isa::avx512_core, spmm_code::pattern)),
        with_dense_semantics(jit_linear_f32(cpu_isa::avx512_core, spmm_code::generic)),
        with_dense_semantics(jit_linear_f32(cpu_isa::avx2, spmm_code::pattern)),
        with_dense_semantics(jit_linear_f32(cpu_isa::avx2, spmm_code::generic)),
        jit_linear_s8(cpu_isa::avx512_core_vnni, spmm_code::pattern),
        jit_linear_s8(cpu_isa::avx512_core_vnni, spmm_code::generic),
        jit_linear_s8(cpu_isa::avx512_core, spmm_code::pattern),
        jit_linear_s8(cpu_isa::avx512_core, spmm_code::generic),
        jit_linear_s8(cpu_isa::avx2, spmm_code::pattern),
        jit_linear_s8(cpu_isa::avx2, spmm_code::generic),
        // Conv2d: both vectorizations of a tier accept; the tuner measures
        // them per layer at its input shape.
        with_dense_semantics(jit_conv2d_batch(quant_scheme::f32, cpu_isa::avx512_core)),
        with_dense_semantics(jit_conv2d_width(quant_scheme::f32, cpu_isa::avx512_core)),
        with_dense_semantics(jit_conv2d_batch(quant_scheme::f32, cpu_isa::avx2)),
        with_dense_semantics(jit_conv2d_width(quant_scheme::f32, cpu_isa::avx2)),
        jit_conv2d_batch(quant_scheme::s8, cpu_isa::avx512_core_vnni),
        jit_conv2d_width(quant_scheme::s8, cpu_isa::avx512_core_vnni),
        jit_conv2d_batch(quant_scheme::s8, cpu_isa::avx512_core),
        jit_conv2d_width(quant_scheme::s8, cpu_isa::avx512_core),
        jit_conv2d_batch(quant_scheme::s8, cpu_isa::avx2),
        jit_conv2d_width(quant_scheme::s8, cpu_isa::avx2),
        dense_onednn_s8_linear_implementation(),
        dense_onednn_s8_conv2d_implementation(),
        with_dense_semantics(ref_implementation()),
    };
    // clang-format on
    return list;
}

} // namespace qsp::detail
