// Small AVX-512 helpers shared by the *_avx512.cpp passes (compiled for
// AVX-512 inside this header's own target region).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "primitives/passes/isa_target.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail::avx512 {

// r[i] <- column i of the 16 x 16 matrix whose rows are r[0..15].
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
        }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// The first n of a vector's 64 byte lanes (none for n <= 0).
inline __mmask64 first_bytes(int64_t n) {
    return n >= 64 ? ~__mmask64(0) : n <= 0 ? __mmask64(0) : (__mmask64(1) << n) - 1;
}

// The byte tiles' transpose: 64 rows of up to 16 bytes -> 16 rows of 64.
// Source row b (b < valid; the rest read as zeros) is the 16 bytes at
// src + b * stride, those past `columns` unread (zeros); destination row k
// (k < columns) gets byte b of row k at dst + k * dst_stride + b, each
// byte ^ flip; with column_sums (or null), column_sums[k] += the sum of
// the source's bytes of column k (as int8), k < columns. Rows b, b + 16,
// b + 32, b + 48 share a register, one per
// 128-bit lane, and each lane makes its own 16 x 16 transpose with four
// rounds of unpacks: 64 byte shuffles per 1 KiB, where widening every byte
// to a float lane for transpose16 took four times as many.
inline void transpose_64x16_bytes(const int8_t *src, int64_t stride, int64_t valid, int64_t columns,
                                  uint8_t *dst, int64_t dst_stride, __m512i flip,
                                  int32_t *column_sums) {
    const uint64_t row_mask = columns >= 16 ? 0xFFFFu : (uint64_t(1) << columns) - 1;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
        __m512i v = _mm512_setzero_si512();
        for (int g = 0; g < 4; ++g) {
            const int64_t b = g * 16 + i;
            if (b >= valid) break;
            // lane g's 16 bytes from row b: a 64-byte masked load that
            // starts 16 * g bytes early (masked-off bytes are never touched)
            const auto at = reinterpret_cast<uintptr_t>(src + b * stride) - 16 * g;
            v = _mm512_mask_loadu_epi8(v, row_mask << (16 * g), reinterpret_cast<const void *>(at));
        }
        r[i] = v;
    }
    if (column_sums) {
        // int16 lanes: each adds 32 bytes of one column (at most 4064 in size)
        __m512i low = _mm512_setzero_si512(), high = low;
        for (int i = 0; i < 16; ++i) {
            low = _mm512_add_epi16(low, _mm512_cvtepi8_epi16(_mm512_castsi512_si256(r[i])));
            high = _mm512_add_epi16(high, _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(r[i], 1)));
        }
        const __m512i both = _mm512_add_epi16(low, high); // lanes k and 16 + k: column k
        const __m256i column =
                _mm256_add_epi16(_mm512_castsi512_si256(both), _mm512_extracti64x4_epi64(both, 1));
        const __mmask16 k = static_cast<__mmask16>(row_mask);
        _mm512_mask_storeu_epi32(column_sums, k,
                                 _mm512_add_epi32(_mm512_maskz_loadu_epi32(k, column_sums),
                                                  _mm512_cvtepi16_epi32(column)));
    }
    __m512i a[16], c[16];
    for (int i = 0; i < 16; i += 2) { // byte pairs of rows (i, i + 1)
        a[i] = _mm512_unpacklo_epi8(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi8(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) // four rows q..q+3 per column, columns 0-3, 4-7, 8-11, 12-15
        for (int h = 0; h < 2; ++h) {
            r[q + 2 * h] = _mm512_unpacklo_epi16(a[q + h], a[q + h + 2]);
            r[q + 2 * h + 1] = _mm512_unpackhi_epi16(a[q + h], a[q + h + 2]);
        }
    for (int o = 0; o < 16; o += 8) // eight rows per column, two columns per register
        for (int k = 0; k < 4; ++k) {
            c[o + 2 * k] = _mm512_unpacklo_epi32(r[o + k], r[o + k + 4]);
            c[o + 2 * k + 1] = _mm512_unpackhi_epi32(r[o + k], r[o + k + 4]);
        }
    // c[m] (rows 0-7) and c[m + 8] (rows 8-15) hold columns 2m and 2m + 1
    for (int m = 0; m < 8; ++m) {
        const int64_t k = 2 * m;
        if (k < columns)
            _mm512_storeu_si512(dst + k * dst_stride,
                                _mm512_xor_si512(_mm512_unpacklo_epi64(c[m], c[m + 8]), flip));
        if (k + 1 < columns)
            _mm512_storeu_si512(dst + (k + 1) * dst_stride,
                                _mm512_xor_si512(_mm512_unpackhi_epi64(c[m], c[m + 8]), flip));
    }
}

} // namespace qsp::detail::avx512

QSP_END_TARGET
