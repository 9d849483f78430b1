// Small AVX2 helpers shared by the *_avx2.cpp passes (compiled for AVX2
// inside this header's own target region).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "primitives/passes/isa_target.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail::avx2 {

// r[i] <- column i of the 8 x 8 matrix whose rows are r[0..7].
inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

// r[i] <- column i of the 16 x 16 byte matrix whose rows are r[0..15]:
// four perfect shuffles (unpack rows i and i + 8, four times).
inline void transpose16_bytes(__m128i r[16]) {
    __m128i u[16];
    for (int round = 0; round < 4; ++round) {
        for (int i = 0; i < 8; ++i) {
            u[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
            u[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
        }
        for (int i = 0; i < 16; ++i)
            r[i] = u[i];
    }
}

// All-ones in the first n (0..8) lanes: the mask of maskload / maskstore.
inline __m256i first_lanes(int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), lane);
}

// The first n lanes at p (the rest zero), and the first n lanes of v stored
// to p: a plain load / store when all 8 are wanted. AMD's masked stores are
// microcoded (about 10x a plain store) and its masked loads cost more than
// plain ones; the passes use them only on the last, partial vector.
inline __m256 load_first(const float *p, int64_t n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(n));
}
inline void store_first(float *p, __m256 v, int64_t n) {
    if (n >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, first_lanes(n), v);
}
// The first n bytes of v stored to p: the whole vector from 32 on, below
// that through a buffer (AVX2 has no byte-masked store, and its dword one is
// microcoded on AMD).
inline void store_first_bytes(void *p, __m256i v, int64_t n) {
    if (n >= 32) {
        _mm256_storeu_si256(static_cast<__m256i *>(p), v);
        return;
    }
    alignas(32) uint8_t bytes[32];
    _mm256_store_si256(reinterpret_cast<__m256i *>(bytes), v);
    std::memcpy(p, bytes, static_cast<size_t>(n < 0 ? 0 : n));
}

// max |v| over the vectors folded in, NaN once one held a NaN (maxps alone
// would drop it: it returns its second operand for a NaN). Exact: the same
// float in any lane order.
struct abs_max_lanes {
    __m256 peak, bad;
    // defined here, not implied: an implicit constructor would be compiled
    // outside this header's AVX2 target region
    abs_max_lanes() : peak(_mm256_setzero_ps()), bad(_mm256_setzero_ps()) {}
    void fold(__m256 v) {
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        peak = _mm256_max_ps(peak, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
    }
    float value() const {
        if (_mm256_movemask_ps(bad)) return std::numeric_limits<float>::quiet_NaN();
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, peak);
        return *std::max_element(lanes, lanes + 8);
    }
};

} // namespace qsp::detail::avx2

QSP_END_TARGET
