// The AVX-512 tier of the BatchNorm backward's elementwise part (called
// only after CPU detection): 16 lanes, the ReLU mask's 16 bits a k-register
// that zeroes the masked gradient as it is loaded (the AVX2 tier builds a
// lane mask from them with four instructions per 8 elements). The float
// operations and their order are the portable tier's, lane for lane, so
// the results are the same bits. The pair of roundings of dY runs in the
// same loop as the dY it rounds (quantize_pair_from_gradient): dY is in a
// register between its computation and its rounding, and never in memory.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/batch_norm_walk.hpp"
#include "primitives/passes/simd_avx512.hpp"
#include "primitives/passes/stochastic_avx512.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail {

namespace avx512 {
namespace {

namespace walk = batch_norm_walk;

// The mask bits of elements bit .. bit + n - 1 (n <= 16, any offset) as a
// k-register; reads the bytes holding them and no other.
inline __mmask16 mask16(const uint8_t *bits, int64_t bit, int64_t n) {
    const int64_t at = bit / 8;
    const int shift = static_cast<int>(bit % 8);
    const int64_t bytes = (shift + std::min<int64_t>(n, 16) + 7) / 8; // 1 to 3
    uint32_t window = bits[at];
    if (bytes > 1) window |= static_cast<uint32_t>(bits[at + 1]) << 8;
    if (bytes > 2) window |= static_cast<uint32_t>(bits[at + 2]) << 16;
    return static_cast<__mmask16>((window >> shift) & first_lanes(n));
}

// The 16 lanes added as batch_norm_walk's tree: j + j+8, j + j+4, then
// (0 + 1) + (2 + 3).
inline float tree_total(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    alignas(16) float l[4];
    _mm_store_ps(l, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    return (l[0] + l[1]) + (l[2] + l[3]);
}

// src - mean of channel x at elements i..i+15 (those of `valid`; 0 elsewhere).
inline __m512 centered16(const walk::f32_centered::channel &x, int64_t i, __mmask16 valid) {
    return _mm512_maskz_sub_ps(valid, _mm512_maskz_loadu_ps(valid, x.x + i), _mm512_set1_ps(x.m));
}
inline __m512 centered16(const walk::s8_centered::channel &x, int64_t i, __mmask16 valid) {
    const __m128i b = _mm_maskz_loadu_epi8(valid, x.q + i);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_set1_ps(x.f));
}

// g (the gradient through the mask, 0 where it is off or past `valid`) and
// dY = (g * a + x * b) + k at elements i..i+15.
struct gradient16 {
    __m512 a, b, k;
    gradient16(float a_, float b_, float k_)
        : a(_mm512_set1_ps(a_)), b(_mm512_set1_ps(b_)), k(_mm512_set1_ps(k_)) {}
    static __m512 masked(const float *diff_dst, const uint8_t *bits, int64_t i, __mmask16 valid,
                         int64_t left) {
        const __mmask16 on = bits ? mask16(bits, i, left) & valid : valid;
        return _mm512_maskz_loadu_ps(on, diff_dst + i);
    }
    template <typename X> __m512 dy(__m512 g, const X &x, int64_t i, __mmask16 valid) const {
        return _mm512_add_ps(
                _mm512_add_ps(_mm512_mul_ps(g, a), _mm512_mul_ps(centered16(x, i, valid), b)), k);
    }
};

struct kernels {
    // gradient_sums' contract: the 16 sum lanes one register per sum (the
    // mask a k-register zeroing g as it loads), the tree, the shared tail.
    template <typename X>
    static void gradient_sums(const float *g, const uint8_t *bits, int64_t base, const X &x,
                              int64_t n, float &sum_out, float &dot_out) {
        __m512 sum = _mm512_setzero_ps(), dot = sum;
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes) {
            const __m512 gv =
                    _mm512_maskz_loadu_ps(bits ? mask16(bits, base + i, 16) : 0xFFFF, g + i);
            sum = _mm512_add_ps(sum, gv);
            dot = _mm512_add_ps(dot, _mm512_mul_ps(gv, centered16(x, base + i, 0xFFFF)));
        }
        float s = tree_total(sum), d = tree_total(dot);
        walk::gradient_sums_tail(g, bits, base, x, i, n, s, d);
        sum_out = s;
        dot_out = d;
    }

    // The forward apply's kernels (batch_norm_walk.hpp's contracts): 16
    // lanes, the tail merge-masked, the portable tier's operations and
    // order; int8 rounded by the conversion's round-half-even (the AVX2
    // tier's float-adder rounding gives the same integers below 2^22).
    static void scale_shift(const float *in, float *out, int64_t b, int64_t e, float a, float k) {
        const __m512 av = _mm512_set1_ps(a), kv = _mm512_set1_ps(k);
        for (int64_t i = b; i < e; i += 16) {
            const __mmask16 m = first_lanes(e - i);
            const __m512 v = _mm512_maskz_loadu_ps(m, in + i);
            _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(_mm512_mul_ps(v, av), kv));
        }
    }
    static void scale_shift_add(const float *in, const float *r, float *out, int64_t b, int64_t e,
                                float a, float k) {
        const __m512 av = _mm512_set1_ps(a), kv = _mm512_set1_ps(k);
        for (int64_t i = b; i < e; i += 16) {
            const __mmask16 m = first_lanes(e - i);
            const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, in + i), av), kv);
            _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, r + i)));
        }
    }
    static void store_rounded(int8_t *q, __mmask16 m, __m512 v) {
        _mm512_mask_cvtsepi32_storeu_epi8(q, m, _mm512_cvtps_epi32(v));
    }
    static void scale_shift_keep(const float *in, float *out, int8_t *q, int64_t b, int64_t e,
                                 float a, float k, float mean, float inv) {
        const __m512 av = _mm512_set1_ps(a), kv = _mm512_set1_ps(k);
        const __m512 mv = _mm512_set1_ps(mean), iv = _mm512_set1_ps(inv);
        for (int64_t i = b; i < e; i += 16) {
            const __mmask16 m = first_lanes(e - i);
            const __m512 v = _mm512_maskz_loadu_ps(m, in + i); // before out (may be in) is written
            store_rounded(q + i, m, _mm512_mul_ps(_mm512_sub_ps(v, mv), iv));
            _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(_mm512_mul_ps(v, av), kv));
        }
    }
    static void write_centered(const float *in, int8_t *q, int64_t b, int64_t e, float mean,
                               float inv) {
        const __m512 mv = _mm512_set1_ps(mean), iv = _mm512_set1_ps(inv);
        for (int64_t i = b; i < e; i += 16) {
            const __mmask16 m = first_lanes(e - i);
            store_rounded(q + i, m,
                          _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, in + i), mv), iv));
        }
    }
    static float abs_max(const float *p, int64_t b, int64_t e) {
        const __m512 sign = _mm512_set1_ps(-0.0f);
        __m512 peak = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t i = b; i < e; i += 16) {
            const __mmask16 m = first_lanes(e - i);
            const __m512 v = _mm512_maskz_loadu_ps(m, p + i);
            bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            peak = _mm512_max_ps(peak, _mm512_andnot_ps(sign, v));
        }
        return bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(peak);
    }
    static void quantize(const float *in, int8_t *q, int64_t b, int64_t e, float inv) {
        const __m512 iv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f),
                     hi = _mm512_set1_ps(127.0f);
        for (int64_t i = b; i < e; i += 16) { // max then min, the limit second: NaN -> -127
            const __mmask16 m = first_lanes(e - i);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, in + i), iv);
            store_rounded(q + i, m, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
        }
    }
    // relu_mask_range's contract (begin a multiple of 8): two mask bytes per
    // vector; the last, partial vector by the portable loop.
    static void relu_range(float *dst, uint8_t *bits, int64_t begin, int64_t end) {
        const __m512 zero = _mm512_setzero_ps();
        int64_t i = begin;
        for (; i + 16 <= end; i += 16) {
            const __m512 v = _mm512_loadu_ps(dst + i);
            // !(x <= 0): set for NaN; max returns its second operand for a
            // NaN or two zeros, as the other tiers'
            const uint16_t on = _mm512_cmp_ps_mask(v, zero, _CMP_NLE_UQ);
            std::memcpy(bits + i / 8, &on, sizeof(on));
            _mm512_storeu_ps(dst + i, _mm512_max_ps(zero, v));
        }
        if (i < end) relu_mask_range(dst, dst, bits, i, end);
    }

    // gradient_apply's contract (batch_norm_walk.hpp): whole vectors, then
    // the portable tail.
    template <typename X>
    static void gradient_apply(const float *diff_dst, const uint8_t *bits, const X &x, int64_t lo,
                               int64_t hi, float a, float b, float k, float *diff_src,
                               float *diff_residual, float *abs_max) {
        const gradient16 grad(a, b, k);
        const __m512 sign = _mm512_set1_ps(-0.0f);
        __m512 peak = _mm512_setzero_ps();
        __mmask16 bad = 0;
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
            const __m512 g = gradient16::masked(diff_dst, bits, i, 0xFFFF, 16);
            if (diff_residual) _mm512_storeu_ps(diff_residual + i, g);
            if (diff_src || abs_max) { // diff_src may be diff_dst: these elements are read
                const __m512 d = grad.dy(g, x, i, 0xFFFF);
                if (diff_src) _mm512_storeu_ps(diff_src + i, d);
                if (abs_max) {
                    bad |= _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
                    peak = _mm512_max_ps(peak, _mm512_andnot_ps(sign, d));
                }
            }
        }
        if (abs_max)
            *abs_max = bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(peak);
        walk::gradient_apply_tail(diff_dst, bits, x, i, hi, a, b, k, diff_src, diff_residual,
                                  abs_max);
    }
};

} // namespace
} // namespace avx512

void masked_gradient_sums_avx512(const float *diff_dst, const uint8_t *bits, centered_source src,
                                 channel_planes s, double *sum_g, double *sum_g_centered,
                                 int num_threads) {
    batch_norm_walk::masked_gradient_sums<avx512::kernels>(diff_dst, bits, src, s, sum_g,
                                                           sum_g_centered, num_threads);
}

void masked_gradient_apply_avx512(const float *diff_dst, const uint8_t *bits, centered_source src,
                                  channel_planes s, const float *a, const float *b, const float *k,
                                  float *diff_src, float *diff_residual, float *channel_abs_max,
                                  int num_threads) {
    batch_norm_walk::masked_gradient_apply<avx512::kernels>(
            diff_dst, bits, src, s, a, b, k, diff_src, diff_residual, channel_abs_max, num_threads);
}

void scale_shift_relu_avx512(const float *src, channel_planes s, const float *scale,
                             const float *shift, const float *residual, float *dst, uint8_t *bits,
                             const centered_s8_writer *keep, const quantized_s8_writer *quantized,
                             float *dst_abs_max, int num_threads) {
    batch_norm_walk::scale_shift_relu<avx512::kernels>(src, s, scale, shift, residual, dst, bits,
                                                       keep, quantized, dst_abs_max, num_threads);
}

void quantize_pair_from_gradient_avx512(const batch_norm_gradient &src, const float *multiplier,
                                        const stochastic_pair_rounding &r, int8_t *q,
                                        int8_t *q_plain, int num_threads) {
    const avx512::stochastic_rounding scaled(r.scaled, r.seed32), plain(r.plain, r.plain_seed32);
    const channel_planes s = src.shape;
    const bool shared = scaled.shares_hash(plain);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    batch_norm_walk::with_centered(src.src, [&](auto centered) {
    // Threads take planes (one channel's run each; only the mask is
    // shared, and it is read).
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t p = 0; p < s.batch * s.channels; ++p) {
            const int64_t c = p % s.channels, lo = p * s.spatial, hi = lo + s.spatial;
            const avx512::gradient16 grad(src.a[c], src.b[c], src.k[c]);
            const __m512 m = _mm512_set1_ps(multiplier[c]);
            const auto x = centered.at(c);
            __m512i idx = _mm512_add_epi32(
                    _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(lo))), lane);
            for (int64_t i = lo; i < hi; i += 16) {
                const __mmask16 valid = avx512::first_lanes(hi - i);
                const __m512 g =
                        avx512::gradient16::masked(src.diff_dst, src.bits, i, valid, hi - i);
                const __m512 d = grad.dy(g, x, i, valid);
                avx512::store_pair(scaled, q + i, _mm512_mul_ps(d, m), plain, q_plain + i, d, idx,
                                   valid, shared);
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
            }
        }
    });
}

} // namespace qsp::detail

QSP_END_TARGET
