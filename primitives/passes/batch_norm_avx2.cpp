// The AVX2 tier of the BatchNorm passes (called only after CPU detection):
// the walk of batch_norm_walk.hpp over kernels that take 8 lanes per
// instruction where the portable ones take 4. Every lane, sum order and
// rounding is the portable kernels' (a lane j of 8 here is the portable
// tier's lane j of its two 4-lane halves, the 16 sum lanes two registers),
// so the results are the same bits. The instruction count halves: on a
// 2-core Xeon the fused BatchNorm+ReLU took a quarter less time per
// element at cache-resident sizes (16x24x28x28), little less at
// 128x24x28x28, where the memory bounds it.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/batch_norm_walk.hpp"
#include "primitives/passes/relu_mask.hpp"
#include "primitives/passes/simd_avx2.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail {

namespace avx2 {
namespace {

namespace walk = batch_norm_walk;

// src - mean of channel x at elements i..i+7.
inline __m256 centered8(const walk::f32_centered::channel &x, int64_t i) {
    return _mm256_sub_ps(_mm256_loadu_ps(x.x + i), _mm256_set1_ps(x.m));
}
inline __m256 centered8(const walk::s8_centered::channel &x, int64_t i) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(x.q + i));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_set1_ps(x.f));
}

// The mask bits of 8 elements from bit `bit` (any offset) as 8 lanes,
// all-ones where set (relu_mask_lanes' contract, one register).
inline __m256 mask8(const uint8_t *bits, int64_t bit) {
    const int64_t at = bit / 8;
    const int shift = static_cast<int>(bit % 8);
    unsigned window = bits[at];
    if (shift != 0) window = (window | static_cast<unsigned>(bits[at + 1]) << 8) >> shift;
    const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i byte = _mm256_set1_epi32(static_cast<int>(window & 0xffu));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bits), lane_bits));
}

// The 16 lanes of two registers (lanes 0-7, 8-15) added as
// batch_norm_walk's tree: j + j+8, j + j+4, then (0 + 1) + (2 + 3).
inline float tree_total(__m256 lanes0, __m256 lanes8) {
    const __m256 h = _mm256_add_ps(lanes0, lanes8);
    alignas(16) float l[4];
    _mm_store_ps(l, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    return (l[0] + l[1]) + (l[2] + l[3]);
}

// The 8 int8 of v rounded as round_to_s8 rounds one (|v| < 127.5 by the
// caller's step), stored.
inline void store_rounded_s8(int8_t *q, __m256 v) {
    const __m256 unit_ulp = _mm256_set1_ps(12582912.0f);
    const __m256i r = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(v, unit_ulp), unit_ulp));
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i *>(q), _mm_packs_epi16(w16, w16));
}
using walk::round_to_s8;

struct kernels {
    static void accumulate(float (&acc)[walk::sum_lanes], const float *p, int64_t n) {
        __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        }
        _mm256_storeu_ps(acc, a0);
        _mm256_storeu_ps(acc + 8, a1);
        for (int j = 0; i < n; ++i, ++j)
            acc[j] += p[i];
    }
    static void accumulate_squares(float (&acc)[walk::sum_lanes], const float *p, int64_t n,
                                   float m) {
        const __m256 mv = _mm256_set1_ps(m);
        __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(p + i), mv);
            const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(p + i + 8), mv);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(d0, d0));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(d1, d1));
        }
        _mm256_storeu_ps(acc, a0);
        _mm256_storeu_ps(acc + 8, a1);
        for (int j = 0; i < n; ++i, ++j)
            acc[j] += (p[i] - m) * (p[i] - m);
    }
    // The sum and the range in one loop: the range's lanes are the
    // portable tier's (element i in lane i % 16: two registers of eight,
    // each half a portable register), the tail in lane 0, the same fold;
    // minps / maxps select the second operand when unordered (a NaN is
    // skipped) or equal. The sum alone bounded the loop before (the range's
    // own loop waited on one min and one max chain per 8 elements).
    static void accumulate_range(float (&acc)[walk::sum_lanes], const float *p, int64_t n,
                                 float &lowest, float &highest) {
        __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
        __m256 lo0 = _mm256_set1_ps(lowest), lo1 = lo0, hi0 = _mm256_set1_ps(highest), hi1 = hi0;
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes) {
            const __m256 v0 = _mm256_loadu_ps(p + i), v1 = _mm256_loadu_ps(p + i + 8);
            a0 = _mm256_add_ps(a0, v0), a1 = _mm256_add_ps(a1, v1);
            lo0 = _mm256_min_ps(v0, lo0), lo1 = _mm256_min_ps(v1, lo1);
            hi0 = _mm256_max_ps(v0, hi0), hi1 = _mm256_max_ps(v1, hi1);
        }
        _mm256_storeu_ps(acc, a0);
        _mm256_storeu_ps(acc + 8, a1);
        for (int j = 0; i + j < n; ++j)
            acc[j] += p[i + j];
        // lanes 0-3 / 4-7 / 8-11 / 12-15: the portable tier's four registers
        __m128 l0 = _mm256_castps256_ps128(lo0), h0 = _mm256_castps256_ps128(hi0);
        for (; i < n; ++i) {
            const __m128 v = _mm_set_ss(p[i]);
            l0 = _mm_move_ss(l0, _mm_min_ss(v, l0));
            h0 = _mm_move_ss(h0, _mm_max_ss(v, h0));
        }
        alignas(16) float lanes[8];
        _mm_store_ps(lanes, _mm_min_ps(_mm_min_ps(l0, _mm256_extractf128_ps(lo0, 1)),
                                       _mm_min_ps(_mm256_castps256_ps128(lo1),
                                                  _mm256_extractf128_ps(lo1, 1))));
        _mm_store_ps(lanes + 4, _mm_max_ps(_mm_max_ps(h0, _mm256_extractf128_ps(hi0, 1)),
                                           _mm_max_ps(_mm256_castps256_ps128(hi1),
                                                      _mm256_extractf128_ps(hi1, 1))));
        walk::fold_range(lanes, lowest, highest);
    }

    static void scale_shift(const float *in, float *out, int64_t b, int64_t e, float a, float k) {
        const __m256 av = _mm256_set1_ps(a), kv = _mm256_set1_ps(k);
        int64_t i = b;
        for (; i + 8 <= e; i += 8)
            _mm256_storeu_ps(out + i,
                             _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), av), kv));
        for (; i < e; ++i)
            out[i] = in[i] * a + k;
    }
    static void scale_shift_add(const float *in, const float *r, float *out, int64_t b, int64_t e,
                                float a, float k) {
        const __m256 av = _mm256_set1_ps(a), kv = _mm256_set1_ps(k);
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), av), kv);
            _mm256_storeu_ps(out + i, _mm256_add_ps(v, _mm256_loadu_ps(r + i)));
        }
        for (; i < e; ++i)
            out[i] = (in[i] * a + k) + r[i];
    }
    static void scale_shift_keep(const float *in, float *out, int8_t *q, int64_t b, int64_t e,
                                 float a, float k, float m, float inv) {
        const __m256 av = _mm256_set1_ps(a), kv = _mm256_set1_ps(k);
        const __m256 mv = _mm256_set1_ps(m), iv = _mm256_set1_ps(inv);
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            const __m256 v = _mm256_loadu_ps(in + i); // read before out (it may be in) is written
            store_rounded_s8(q + i, _mm256_mul_ps(_mm256_sub_ps(v, mv), iv));
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(v, av), kv));
        }
        for (; i < e; ++i) {
            const float v = in[i];
            q[i] = round_to_s8((v - m) * inv);
            out[i] = v * a + k;
        }
    }
    static float abs_max(const float *p, int64_t b, int64_t e) {
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 peak = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
            const __m256 v = _mm256_loadu_ps(p + i);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v));
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, peak);
        float folded = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
        for (float l : lanes)
            folded = walk::fold_abs_max(folded, l);
        for (; i < e; ++i)
            folded = walk::fold_abs_max(folded, std::fabs(p[i]));
        return folded;
    }
    static void quantize(const float *in, int8_t *q, int64_t b, int64_t e, float inv) {
        const __m256 iv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f),
                     hi = _mm256_set1_ps(127.0f);
        int64_t i = b;
        for (; i + 8 <= e; i += 8) { // max then min, the limit second: NaN -> -127
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(in + i), iv);
            store_rounded_s8(q + i, _mm256_min_ps(_mm256_max_ps(v, lo), hi));
        }
        for (; i < e; ++i)
            q[i] = round_to_s8(walk::clamp_to_s8_range(in[i] * inv));
    }
    static void write_centered(const float *in, int8_t *q, int64_t b, int64_t e, float m,
                               float inv) {
        const __m256 mv = _mm256_set1_ps(m), iv = _mm256_set1_ps(inv);
        int64_t i = b;
        for (; i + 8 <= e; i += 8)
            store_rounded_s8(q + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(in + i), mv), iv));
        for (; i < e; ++i)
            q[i] = round_to_s8((in[i] - m) * inv);
    }
    // relu_mask_range's contract (begin a multiple of 8): a whole mask byte
    // per vector; the last, partial byte by the portable loop.
    static void relu_range(float *dst, uint8_t *bits, int64_t begin, int64_t end) {
        const __m256 zero = _mm256_setzero_ps();
        int64_t i = begin;
        for (; i + 8 <= end; i += 8) {
            const __m256 v = _mm256_loadu_ps(dst + i);
            // !(x <= 0): set for NaN, as cmpnle_ps; max returns its second
            // operand for a NaN or two zeros, as the portable tier's
            bits[i / 8] =
                    static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NLE_UQ)));
            _mm256_storeu_ps(dst + i, _mm256_max_ps(zero, v));
        }
        if (i < end) relu_mask_range(dst, dst, bits, i, end);
    }

    // the portable tier's 16 lanes: two registers of eight per sum
    template <typename X>
    static void gradient_sums(const float *g, const uint8_t *bits, int64_t base, const X &x,
                              int64_t n, float &sum_out, float &dot_out) {
        __m256 sum0 = _mm256_setzero_ps(), sum1 = sum0, dot0 = sum0, dot1 = sum0;
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes) {
            __m256 g0 = _mm256_loadu_ps(g + i), g1 = _mm256_loadu_ps(g + i + 8);
            if (bits) {
                g0 = _mm256_and_ps(g0, mask8(bits, base + i));
                g1 = _mm256_and_ps(g1, mask8(bits, base + i + 8));
            }
            sum0 = _mm256_add_ps(sum0, g0), sum1 = _mm256_add_ps(sum1, g1);
            dot0 = _mm256_add_ps(dot0, _mm256_mul_ps(g0, centered8(x, base + i)));
            dot1 = _mm256_add_ps(dot1, _mm256_mul_ps(g1, centered8(x, base + i + 8)));
        }
        float s = tree_total(sum0, sum1), d = tree_total(dot0, dot1);
        walk::gradient_sums_tail(g, bits, base, x, i, n, s, d);
        sum_out = s;
        dot_out = d;
    }

    template <typename X>
    static void gradient_apply(const float *diff_dst, const uint8_t *bits, const X &x, int64_t lo,
                               int64_t hi, float a, float b, float k, float *diff_src,
                               float *diff_residual, float *abs_max) {
        const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b), kv = _mm256_set1_ps(k);
        avx2::abs_max_lanes peak;
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            __m256 g = _mm256_loadu_ps(diff_dst + i);
            if (bits) g = _mm256_and_ps(g, mask8(bits, i));
            if (diff_residual) _mm256_storeu_ps(diff_residual + i, g);
            if (diff_src || abs_max) { // diff_src may be diff_dst: these elements are read
                const __m256 d = _mm256_add_ps(
                        _mm256_add_ps(_mm256_mul_ps(g, av), _mm256_mul_ps(centered8(x, i), bv)),
                        kv);
                if (diff_src) _mm256_storeu_ps(diff_src + i, d);
                if (abs_max) peak.fold(d);
            }
        }
        if (abs_max) *abs_max = peak.value();
        walk::gradient_apply_tail(diff_dst, bits, x, i, hi, a, b, k, diff_src, diff_residual,
                                  abs_max);
    }
};

} // namespace
} // namespace avx2

void channel_statistics_avx2(const float *src, channel_planes s, double *mean, double *var,
                             channel_range *range, int num_threads) {
    batch_norm_walk::channel_statistics<avx2::kernels>(src, s, mean, var, range, num_threads);
}

void scale_shift_relu_avx2(const float *src, channel_planes s, const float *scale,
                           const float *shift, const float *residual, float *dst, uint8_t *bits,
                           const centered_s8_writer *keep, const quantized_s8_writer *quantized,
                           float *dst_abs_max, int num_threads) {
    batch_norm_walk::scale_shift_relu<avx2::kernels>(src, s, scale, shift, residual, dst, bits,
                                                     keep, quantized, dst_abs_max, num_threads);
}

void masked_gradient_sums_avx2(const float *diff_dst, const uint8_t *bits, centered_source src,
                               channel_planes s, double *sum_g, double *sum_g_centered,
                               int num_threads) {
    batch_norm_walk::masked_gradient_sums<avx2::kernels>(diff_dst, bits, src, s, sum_g,
                                                         sum_g_centered, num_threads);
}

void masked_gradient_apply_avx2(const float *diff_dst, const uint8_t *bits, centered_source src,
                                channel_planes s, const float *a, const float *b, const float *k,
                                float *diff_src, float *diff_residual, float *channel_abs_max,
                                int num_threads) {
    batch_norm_walk::masked_gradient_apply<avx2::kernels>(
            diff_dst, bits, src, s, a, b, k, diff_src, diff_residual, channel_abs_max, num_threads);
}

void quantize_pair_from_gradient_avx2(const batch_norm_gradient &src, const float *multiplier,
                                      const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain,
                                      int num_threads) {
    batch_norm_walk::quantize_pair_from_gradient<avx2::kernels>(src, multiplier, r, q, q_plain,
                                                                num_threads);
}

} // namespace qsp::detail

QSP_END_TARGET
