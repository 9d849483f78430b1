#include "primitives/quantize.hpp"

#include "primitives/ref/ref_kernels.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

float fast_quantize_rne(const float *x, int64_t n, int8_t *q, int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return quantize_rne_avx512(x, n, q, num_threads);
    return ref::quantize_rne(x, n, q, num_threads);
}

float fast_quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
                               uint32_t seed32, int8_t *q, int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return quantize_stochastic_avx512(x, n, multiplier, channels, seed32, q, num_threads);
    return ref::quantize_stochastic(x, n, multiplier, channels, 1, seed32, q, num_threads);
}

void fast_quantize_weights(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                           int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        quantize_weights_avx512(p.row_ptr(), p.rows(), values, q, scale, num_threads);
    else
        ref::quantize_weights(p, values, q, scale, num_threads);
}

} // namespace qsp::detail
