// The AVX-512 stochastic rounding of the s8 scheme (quantization.hpp's
// rules, 16 lanes at a time), shared by the quantize passes and the
// BatchNorm passes that round a gradient as they compute it.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "primitives/passes/isa_target.hpp"
#include "qsparseprop/quantization.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail::avx512 {

inline void store_q(int8_t *q, __m512 v, __mmask16 k) {
    const __m512 lim = _mm512_set1_ps(static_cast<float>(quant_max));
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
    _mm512_mask_cvtepi32_storeu_epi8(q, k, _mm512_cvttps_epi32(v)); // v is integral already
}

inline __m512i mix32(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x7feb352du)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// One stochastic rounding's vector step: floor(v / scale + u), u from the
// counter hash of the 16 flat indices, clamped and stored (zeros when the
// scale is unusable).
struct stochastic_rounding {
    quant_scale s;
    __m512 inv;
    __m512i seed;
    stochastic_rounding(float abs_max, uint32_t seed32)
        : stochastic_rounding(quant_scale_from_abs_max(abs_max), seed32) {}
    stochastic_rounding(quant_scale scale, uint32_t seed32)
        : s(scale), inv(_mm512_set1_ps(s.inv)), seed(_mm512_set1_epi32(static_cast<int>(seed32))) {}
    // floor(v / scale + u) before the clamp; the noise of element idx
    // (each lane's flat index mod 2^32): mix32(idx ^ seed32) >> 8, times 2^-24.
    __m512 rounded(__m512 v, __m512i idx) const {
        const __m512i h = mix32(_mm512_xor_si512(idx, seed));
        const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)),
                                       _mm512_set1_ps(1.0f / 16777216.0f));
        return _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(v, inv), u),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    }
    void store(int8_t *q, __m512 v, __m512i idx, __mmask16 k) const {
        if (!s.usable) {
            _mm512_mask_cvtepi32_storeu_epi8(q, k, _mm512_setzero_si512());
            return;
        }
        store_q(q, rounded(v, idx), k);
    }
};

} // namespace qsp::detail::avx512

QSP_END_TARGET
