// The s8 quantization passes at speed: AVX-512 when the effective ISA has
// it, the reference otherwise. Bit-identical to primitives/ref (tested): the
// same float operations in the same order, just 16 lanes at a time.
#pragma once

#include <cstdint>

namespace qsp::detail {

float fast_quantize_rne(const float *x, int64_t n, int8_t *q, int num_threads);
// Linear only (inner == 1): multiplier indexed by i % channels.
float fast_quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
        uint32_t seed32, int8_t *q, int num_threads);

// The AVX-512 bodies (quantize_avx512.cpp).
float quantize_rne_avx512(const float *x, int64_t n, int8_t *q, int num_threads);
float quantize_stochastic_avx512(const float *x, int64_t n, const float *multiplier, int64_t channels,
        uint32_t seed32, int8_t *q, int num_threads);

} // namespace qsp::detail
