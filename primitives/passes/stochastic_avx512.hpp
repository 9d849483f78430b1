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

inline __m512i mix32(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x7feb352du)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// One stochastic rounding's vector step (quantization.hpp's stochastic_round
// of 16 lanes): v / scale clamped, then the fixed-point floor with the
// stream's half of each lane's hash; stored as int8 (zeros when the scale is
// unusable).
struct stochastic_rounding {
    quant_scale s;
    __m512 inv;
    __m512i key; // the stream key without bit 0: what the hash mixes in
    uint32_t key32;
    stochastic_rounding(float abs_max, uint32_t seed32)
        : stochastic_rounding(quant_scale_from_abs_max(abs_max), seed32) {}
    stochastic_rounding(quant_scale scale, uint32_t seed32)
        : s(scale), inv(_mm512_set1_ps(s.inv)),
          key(_mm512_set1_epi32(static_cast<int>(seed32 & ~1u))), key32(seed32) {}
    // The hash of 16 flat indices (each lane's index mod 2^32).
    __m512i hash(__m512i idx) const { return mix32(_mm512_xor_si512(idx, key)); }
    // Whether `other`'s noise is the other half of this stream's hash.
    bool shares_hash(const stochastic_rounding &other) const {
        return (key32 | 1u) == (other.key32 | 1u);
    }
    // sr(v / scale) in [-127, 127], the noise this stream's half of h.
    __m512i rounded(__m512 v, __m512i h) const {
        const __m512 lim = _mm512_set1_ps(static_cast<float>(quant_max));
        // max(t, -127) first: a NaN t becomes -127, as in stochastic_round
        const __m512 t = _mm512_min_ps(
                _mm512_max_ps(_mm512_mul_ps(v, inv), _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
        const __m512i fixed = _mm512_cvtps_epi32(_mm512_mul_ps(t, _mm512_set1_ps(65536.f)));
        const __m512i noise = (key32 & 1u) ? _mm512_srli_epi32(h, 16)
                                           : _mm512_and_si512(h, _mm512_set1_epi32(0xffff));
        return _mm512_srai_epi32(_mm512_add_epi32(fixed, noise), 16);
    }
    void store_hashed(int8_t *q, __m512 v, __m512i h, __mmask16 k) const {
        _mm512_mask_cvtepi32_storeu_epi8(q, k, s.usable ? rounded(v, h) : _mm512_setzero_si512());
    }
    void store(int8_t *q, __m512 v, __m512i idx, __mmask16 k) const {
        store_hashed(q, v, s.usable ? hash(idx) : _mm512_setzero_si512(), k);
    }
};

// A pair's two roundings of 16 elements (G2 of v, G1 of v_plain): one hash
// serves both where their streams share it (`shared`, the pair's keys
// differing in bit 0 only, as s8_protocol.hpp's streams do).
inline void store_pair(const stochastic_rounding &scaled, int8_t *q, __m512 v,
                       const stochastic_rounding &plain, int8_t *q_plain, __m512 v_plain,
                       __m512i idx, __mmask16 k, bool shared) {
    const __m512i h = scaled.hash(idx);
    scaled.store_hashed(q, v, h, k);
    plain.store_hashed(q_plain, v_plain, shared ? h : plain.hash(idx), k);
}

} // namespace qsp::detail::avx512

QSP_END_TARGET
