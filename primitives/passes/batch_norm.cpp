#include "primitives/passes/batch_norm.hpp"

#include "primitives/passes/batch_norm_walk.hpp"
#include "primitives/passes/entry_arguments.hpp"
#include "primitives/passes/pass_tiers.hpp"
#include "primitives/passes/relu_mask.hpp"
#include "qsparseprop/primitives.hpp"
#include "qsparseprop/quantization.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <omp.h>

#include <emmintrin.h>

// The portable tier's kernels: C++ with SSE2 intrinsics (part of x86-64
// itself, no ISA target) where GCC's vectoriser left a loop scalar or a
// masked copy in between. The walk, shared with the vector tiers, is in
// batch_norm_walk.hpp.
namespace qsp::detail {

namespace {

namespace walk = batch_norm_walk;

using walk::round_to_s8;

// src - mean of channel x at elements i..i+7, as two vectors of 4.
struct lanes8 {
    __m128 lo, hi;
};
inline lanes8 centered8(const walk::f32_centered::channel &x, int64_t i) {
    const __m128 m = _mm_set1_ps(x.m);
    return {_mm_sub_ps(_mm_loadu_ps(x.x + i), m), _mm_sub_ps(_mm_loadu_ps(x.x + i + 4), m)};
}
inline lanes8 centered8(const walk::s8_centered::channel &x, int64_t i) {
    // 8 int8 widened by unpacking with themselves and arithmetic shifts
    // (SSE2 has no sign extension)
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(x.q + i));
    const __m128i w = _mm_srai_epi16(_mm_unpacklo_epi8(b, b), 8);
    const __m128 f = _mm_set1_ps(x.f);
    return {_mm_mul_ps(_mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(w, w), 16)), f),
            _mm_mul_ps(_mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpackhi_epi16(w, w), 16)), f)};
}

// The 16 lanes of four registers (lanes 0-3, 4-7, 8-11, 12-15) added as
// batch_norm_walk's tree: j + j+8, j + j+4, then (0 + 1) + (2 + 3).
inline float tree_total(const __m128 (&r)[4]) {
    alignas(16) float l[4];
    _mm_store_ps(l, _mm_add_ps(_mm_add_ps(r[0], r[2]), _mm_add_ps(r[1], r[3])));
    return (l[0] + l[1]) + (l[2] + l[3]);
}

// Adds f(i) over [0, n) into the lanes of acc (element i into lane i % 16).
template <typename F> void lane_accumulate(float (&acc)[walk::sum_lanes], int64_t n, F f) {
    int64_t i = 0;
    for (; i + walk::sum_lanes <= n; i += walk::sum_lanes)
        for (int j = 0; j < walk::sum_lanes; ++j)
            acc[j] += f(i + j);
    for (int j = 0; i < n; ++i, ++j)
        acc[j] += f(i);
}

struct portable_kernels {
    static void accumulate(float (&acc)[walk::sum_lanes], const float *p, int64_t n) {
        lane_accumulate(acc, n, [p](int64_t i) { return p[i]; });
    }
    static void accumulate_squares(float (&acc)[walk::sum_lanes], const float *p, int64_t n,
                                   float m) {
        lane_accumulate(acc, n, [p, m](int64_t i) { return (p[i] - m) * (p[i] - m); });
    }

    // accumulate, and in the same loop the range: SSE2's minps / maxps are
    // exactly the selects `v < lo ? v : lo` and `v > hi ? v : hi` (the
    // second operand when unordered: a NaN is skipped); GCC left those
    // selects scalar, the statistics pass's largest cost (128x24x28x28, 2
    // threads: 1.04 -> 0.59 ms). The range's lanes are the sum's (element i
    // in lane i % 16, four registers of four), the tail in lane 0, then
    // walk::fold_range: with the operands' order, the sign of a zero
    // extreme is every tier's.
    static void accumulate_range(float (&acc)[walk::sum_lanes], const float *p, int64_t n,
                                 float &lowest, float &highest) {
        accumulate(acc, p, n);
        __m128 lo[4], hi[4];
        for (int r = 0; r < 4; ++r)
            lo[r] = _mm_set1_ps(lowest), hi[r] = _mm_set1_ps(highest);
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes)
            for (int r = 0; r < 4; ++r) {
                const __m128 v = _mm_loadu_ps(p + i + 4 * r);
                lo[r] = _mm_min_ps(v, lo[r]), hi[r] = _mm_max_ps(v, hi[r]);
            }
        for (; i < n; ++i) { // lane 0 only (min_ss takes the other lanes from v)
            const __m128 v = _mm_set_ss(p[i]);
            lo[0] = _mm_move_ss(lo[0], _mm_min_ss(v, lo[0]));
            hi[0] = _mm_move_ss(hi[0], _mm_max_ss(v, hi[0]));
        }
        alignas(16) float lanes[8];
        _mm_store_ps(lanes, _mm_min_ps(_mm_min_ps(lo[0], lo[1]), _mm_min_ps(lo[2], lo[3])));
        _mm_store_ps(lanes + 4, _mm_max_ps(_mm_max_ps(hi[0], hi[1]), _mm_max_ps(hi[2], hi[3])));
        walk::fold_range(lanes, lowest, highest);
    }

    static void scale_shift(const float *in, float *out, int64_t b, int64_t e, float a, float k) {
#pragma omp simd
        for (int64_t i = b; i < e; ++i)
            out[i] = in[i] * a + k;
    }
    static void scale_shift_add(const float *in, const float *r, float *out, int64_t b, int64_t e,
                                float a, float k) {
#pragma omp simd
        for (int64_t i = b; i < e; ++i)
            out[i] = (in[i] * a + k) + r[i];
    }
    // Arguments, not struct members: an int8 store may alias anything, so
    // pointers read through a struct would be reloaded per element (and
    // the loop not vectorized).
    static void scale_shift_keep(const float *in, float *out, int8_t *q, int64_t b, int64_t e,
                                 float a, float k, float m, float inv) {
#pragma omp simd
        for (int64_t i = b; i < e; ++i) {
            const float v = in[i];
            q[i] = round_to_s8((v - m) * inv);
            out[i] = v * a + k;
        }
    }
    static void quantize(const float *in, int8_t *q, int64_t b, int64_t e, float inv) {
#pragma omp simd
        for (int64_t i = b; i < e; ++i)
            q[i] = round_to_s8(walk::clamp_to_s8_range(in[i] * inv));
    }
    static float abs_max(const float *p, int64_t b, int64_t e) {
        float peak = 0.0f;
        for (int64_t i = b; i < e; ++i)
            peak = walk::fold_abs_max(peak, std::fabs(p[i]));
        return peak;
    }
    static void write_centered(const float *in, int8_t *q, int64_t b, int64_t e, float m,
                               float inv) {
#pragma omp simd
        for (int64_t i = b; i < e; ++i)
            q[i] = round_to_s8((in[i] - m) * inv);
    }
    static void relu_range(float *dst, uint8_t *bits, int64_t begin, int64_t end) {
        relu_mask_range(dst, dst, bits, begin, end);
    }

    // 16 lanes (four registers of four per sum: the sums wait on the
    // adder's latency, not on one register's chain per 8 elements), the
    // ReLU's mask applied in registers (with a masked copy of the plane
    // first, then the sums over it, the pass took 0.39 ms at 128x96x7x7,
    // then 0.24).
    template <typename X>
    static void gradient_sums(const float *g, const uint8_t *bits, int64_t base, const X &x,
                              int64_t n, float &sum_out, float &dot_out) {
        __m128 sum[4], dot[4];
        for (int r = 0; r < 4; ++r)
            sum[r] = _mm_setzero_ps(), dot[r] = _mm_setzero_ps();
        int64_t i = 0;
        for (; i + walk::sum_lanes <= n; i += walk::sum_lanes)
            for (int h = 0; h < 2; ++h) { // lanes 0-7, then 8-15
                const int64_t at = i + 8 * h;
                __m128 g0 = _mm_loadu_ps(g + at), g1 = _mm_loadu_ps(g + at + 4);
                if (bits) {
                    const mask_lanes m = relu_mask_lanes(bits, base + at);
                    g0 = _mm_and_ps(g0, m.lo), g1 = _mm_and_ps(g1, m.hi);
                }
                const lanes8 xc = centered8(x, base + at);
                sum[2 * h] = _mm_add_ps(sum[2 * h], g0);
                sum[2 * h + 1] = _mm_add_ps(sum[2 * h + 1], g1);
                dot[2 * h] = _mm_add_ps(dot[2 * h], _mm_mul_ps(g0, xc.lo));
                dot[2 * h + 1] = _mm_add_ps(dot[2 * h + 1], _mm_mul_ps(g1, xc.hi));
            }
        float s = tree_total(sum), d = tree_total(dot);
        walk::gradient_sums_tail(g, bits, base, x, i, n, s, d);
        sum_out = s;
        dot_out = d;
    }

    // g masked in registers (a masked copy first, read back, cost a
    // quarter of the pass), stored as the residual's gradient (which it
    // is) when wanted; then the gradient, (g * a + x * b) + k.
    template <typename X>
    static void gradient_apply(const float *diff_dst, const uint8_t *bits, const X &x, int64_t lo,
                               int64_t hi, float a, float b, float k, float *diff_src,
                               float *diff_residual, float *abs_max) {
        const __m128 av = _mm_set1_ps(a), bv = _mm_set1_ps(b), kv = _mm_set1_ps(k);
        const auto gradient = [&](__m128 g, __m128 xc) {
            return _mm_add_ps(_mm_add_ps(_mm_mul_ps(g, av), _mm_mul_ps(xc, bv)), kv);
        };
        const __m128 sign = _mm_set1_ps(-0.0f);
        __m128 peak = _mm_setzero_ps(), bad = peak;
        const auto fold = [&](__m128 d) {
            bad = _mm_or_ps(bad, _mm_cmpunord_ps(d, d));
            peak = _mm_max_ps(peak, _mm_andnot_ps(sign, d));
        };
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            __m128 g0 = _mm_loadu_ps(diff_dst + i), g1 = _mm_loadu_ps(diff_dst + i + 4);
            if (bits) {
                const mask_lanes m = relu_mask_lanes(bits, i);
                g0 = _mm_and_ps(g0, m.lo), g1 = _mm_and_ps(g1, m.hi);
            }
            if (diff_residual) {
                _mm_storeu_ps(diff_residual + i, g0);
                _mm_storeu_ps(diff_residual + i + 4, g1);
            }
            if (diff_src || abs_max) { // diff_src may be diff_dst: these elements are read
                const lanes8 xc = centered8(x, i);
                const __m128 d0 = gradient(g0, xc.lo), d1 = gradient(g1, xc.hi);
                if (diff_src) {
                    _mm_storeu_ps(diff_src + i, d0);
                    _mm_storeu_ps(diff_src + i + 4, d1);
                }
                if (abs_max) fold(d0), fold(d1);
            }
        }
        if (abs_max) {
            alignas(16) float l[4];
            _mm_store_ps(l, peak);
            *abs_max = _mm_movemask_ps(bad) ? std::numeric_limits<float>::quiet_NaN()
                                            : std::max(std::max(l[0], l[1]), std::max(l[2], l[3]));
        }
        walk::gradient_apply_tail(diff_dst, bits, x, i, hi, a, b, k, diff_src, diff_residual,
                                  abs_max);
    }
};

} // namespace

void portable::channel_statistics(const float *src, channel_planes s, double *mean, double *var,
                                  channel_range *range, int num_threads) {
    walk::channel_statistics<portable_kernels>(src, s, mean, var, range, num_threads);
}

void portable::scale_shift_relu(const float *src, channel_planes s, const float *scale,
                                const float *shift, const float *residual, float *dst,
                                uint8_t *bits, const centered_s8_writer *keep,
                                const quantized_s8_writer *quantized, float *dst_abs_max,
                                int num_threads) {
    walk::scale_shift_relu<portable_kernels>(src, s, scale, shift, residual, dst, bits, keep,
                                             quantized, dst_abs_max, num_threads);
}

void portable::masked_gradient_sums(const float *diff_dst, const uint8_t *bits, centered_source src,
                                    channel_planes s, double *sum_g, double *sum_g_centered,
                                    int num_threads) {
    walk::masked_gradient_sums<portable_kernels>(diff_dst, bits, src, s, sum_g, sum_g_centered,
                                                 num_threads);
}

void portable::masked_gradient_apply(const float *diff_dst, const uint8_t *bits,
                                     centered_source src, channel_planes s, const float *a,
                                     const float *b, const float *k, float *diff_src,
                                     float *diff_residual, float *channel_abs_max,
                                     int num_threads) {
    walk::masked_gradient_apply<portable_kernels>(diff_dst, bits, src, s, a, b, k, diff_src,
                                                  diff_residual, channel_abs_max, num_threads);
}

// Each pass: the best tier the effective ISA allows (pass_tiers.hpp).
void channel_statistics(const float *src, channel_planes s, double *mean, double *var,
                        channel_range *range, int num_threads) {
    static constexpr pass_tier<channel_statistics_fn> tiers[] = {
            {cpu_isa::avx2, channel_statistics_avx2}, {cpu_isa::ref, portable::channel_statistics}};
    best_tier(tiers)(src, s, mean, var, range, num_threads);
}

void channel_statistics_from_parts(const statistics_part *parts, int64_t outer, int64_t channels,
                                   int64_t per_channel, double *mean, double *var,
                                   channel_range *range, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
        double count = 0, m = 0, m2 = 0;
        float lowest = std::numeric_limits<float>::infinity(), highest = -lowest;
        for (int64_t o = 0; o < outer; ++o)
            for (int64_t j = 0; j < per_channel; ++j) {
                const statistics_part &p = parts[(o * channels + c) * per_channel + j];
                if (p.count == 0) continue;
                const double total = count + p.count;
                const double delta = p.mean - m;
                m += delta * p.count / total;
                m2 += std::max(0.0, p.m2) + delta * delta * count * p.count / total;
                count = total;
                lowest = p.range.lowest < lowest ? p.range.lowest : lowest;
                highest = p.range.highest > highest ? p.range.highest : highest;
            }
        mean[c] = m;
        var[c] = count > 0 ? m2 / count : 0.0;
        if (range) range[c] = {lowest, highest};
    }
}

void scale_shift_relu(const float *src, channel_planes s, const float *scale, const float *shift,
                      const float *residual, float *dst, uint8_t *bits,
                      const centered_s8_writer *keep, const quantized_s8_writer *quantized,
                      float *dst_abs_max, int num_threads) {
    static constexpr pass_tier<scale_shift_relu_fn> tiers[] = {
            {cpu_isa::avx512_core, scale_shift_relu_avx512},
            {cpu_isa::avx2, scale_shift_relu_avx2},
            {cpu_isa::ref, portable::scale_shift_relu}};
    best_tier(tiers)(src, s, scale, shift, residual, dst, bits, keep, quantized, dst_abs_max,
                     num_threads);
}

void masked_gradient_sums(const float *diff_dst, const uint8_t *bits, centered_source src,
                          channel_planes s, double *sum_g, double *sum_g_centered,
                          int num_threads) {
    static constexpr pass_tier<masked_gradient_sums_fn> tiers[] = {
            {cpu_isa::avx512_core, masked_gradient_sums_avx512},
            {cpu_isa::avx2, masked_gradient_sums_avx2},
            {cpu_isa::ref, portable::masked_gradient_sums}};
    best_tier(tiers)(diff_dst, bits, src, s, sum_g, sum_g_centered, num_threads);
}

void portable::quantize_pair_from_gradient(const batch_norm_gradient &src, const float *multiplier,
                                           const stochastic_pair_rounding &r, int8_t *q,
                                           int8_t *q_plain, int num_threads) {
    walk::quantize_pair_from_gradient<portable_kernels>(src, multiplier, r, q, q_plain,
                                                        num_threads);
}

void quantize_pair_from_gradient(const batch_norm_gradient &src, const float *multiplier,
                                 const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain,
                                 int num_threads) {
    static constexpr pass_tier<quantize_pair_from_gradient_fn> tiers[] = {
            {cpu_isa::avx512_core, quantize_pair_from_gradient_avx512},
            {cpu_isa::avx2, quantize_pair_from_gradient_avx2},
            {cpu_isa::ref, portable::quantize_pair_from_gradient}};
    best_tier(tiers)(src, multiplier, r, q, q_plain, num_threads);
}

void masked_gradient_apply(const float *diff_dst, const uint8_t *bits, centered_source src,
                           channel_planes s, const float *a, const float *b, const float *k,
                           float *diff_src, float *diff_residual, float *channel_abs_max,
                           int num_threads) {
    static constexpr pass_tier<masked_gradient_apply_fn> tiers[] = {
            {cpu_isa::avx512_core, masked_gradient_apply_avx512},
            {cpu_isa::avx2, masked_gradient_apply_avx2},
            {cpu_isa::ref, portable::masked_gradient_apply}};
    best_tier(tiers)(diff_dst, bits, src, s, a, b, k, diff_src, diff_residual, channel_abs_max,
                     num_threads);
}

} // namespace qsp::detail

// The public entry points (qsparseprop/primitives.hpp): argument checks,
// the per-channel arithmetic, then the passes.
namespace qsp {

namespace {

using detail::threads_or_default;

detail::channel_planes checked_planes(const batch_norm_relu_desc &d) {
    const char *what = "batch_norm_relu: ";
    if (d.batch < 0 || d.channels < 1 || d.spatial < 1)
        throw std::invalid_argument(std::string(what)
                                    + "batch must be >= 0 and channels, spatial >= 1, got "
                                    + std::to_string(d.batch) + ", " + std::to_string(d.channels)
                                    + ", " + std::to_string(d.spatial));
    if (!(d.epsilon >= 0) || !std::isfinite(d.epsilon))
        throw std::invalid_argument(std::string(what) + "epsilon must be finite and >= 0, got "
                                    + std::to_string(d.epsilon));
    if (d.batch_statistics && d.batch == 0)
        throw std::invalid_argument(std::string(what)
                                    + "batch statistics of an empty batch are undefined");
    return {d.batch, d.channels, d.spatial};
}

void require(const void *p, const char *name) {
    detail::require_non_null(p, "batch_norm_relu", name);
}

} // namespace

namespace {

// The int8 copy's step and its inverse: the scheme's scale of the
// channel's largest |src - mean| (as float arithmetic gives it: rounding is
// monotone, so that is the larger of highest - mean and mean - lowest).
quant_scale centering_scale(detail::channel_range r, float mean) {
    if (!std::isfinite(mean)) return quant_scale_from_abs_max(mean);
    return quant_scale_from_abs_max(std::max(r.highest - mean, mean - r.lowest));
}

void require_int8_copy(const batch_norm_relu_desc &d, const int8_t *centered, const float *step) {
    if (!d.batch_statistics)
        throw std::invalid_argument("batch_norm_relu: an int8 copy of src needs batch statistics "
                                    "(with running statistics keep src itself)");
    require(centered, "centered");
    require(step, "step");
}

// The backward's src - mean: from the forward's src, or from its int8 copy.
detail::centered_source f32_source(const batch_norm_relu_desc &d, const float *src,
                                   const float *mean) {
    require(mean, "mean");
    if (d.batch > 0) require(src, "src");
    detail::centered_source from;
    from.src = src, from.mean = mean;
    return from;
}
detail::centered_source s8_source(const batch_norm_relu_desc &d, const int8_t *centered,
                                  const float *step) {
    require(step, "step");
    if (d.batch > 0) require(centered, "centered");
    detail::centered_source from;
    from.values = centered, from.step = step;
    return from;
}

// max |dst| over the tensor, from each channel's range: dst = relu?(src *
// scale + shift) is monotone in src per channel (float rounding is
// monotone), so its largest magnitude is at the channel's lowest or highest
// src — the same arithmetic as the apply kernels (no residual), so the same
// float as a pass over dst would find; NaN where a channel's scale or shift
// is (its mean was: a NaN or an infinity in src).
float dst_abs_max_from_ranges(const std::vector<detail::channel_range> &range,
                              const std::vector<float> &scale, const std::vector<float> &shift,
                              bool relu) {
    float peak = 0.0f;
    for (size_t c = 0; c < range.size(); ++c)
        for (float v : {range[c].lowest, range[c].highest}) {
            float z = v * scale[c] + shift[c];
            if (relu) z = z > 0.0f || z != z ? z : 0.0f;
            if (z != z) return std::numeric_limits<float>::quiet_NaN();
            peak = std::max(peak, std::fabs(z));
        }
    return peak;
}

void forward(const batch_norm_relu_desc &d, const float *src, const float *residual,
             const float *gamma, const float *beta, const float *running_mean,
             const float *running_var, float *dst, uint8_t *mask, float *mean, float *invstd,
             float *batch_var, int8_t *centered, float *step, float *dst_abs_max, int num_threads,
             const batch_norm_known_statistics *known,
             const batch_norm_quantized_dst *quantized = nullptr) {
    const detail::channel_planes s = checked_planes(d);
    if (known) {
        if (!d.batch_statistics)
            throw std::invalid_argument("batch_norm_relu: known statistics stand for the batch's "
                                        "(batch_statistics); without them the running statistics "
                                        "are used");
        require(known->mean, "known mean");
        require(known->variance, "known variance");
        if (centered) require(known->range, "known range (the int8 copy of src needs it)");
    }
    require(mean, "mean");
    require(invstd, "invstd");
    if (d.relu) require(mask, "mask");
    if (!d.batch_statistics) {
        require(running_mean, "running_mean");
        require(running_var, "running_var");
    }
    if (quantized) require(quantized->scale, "quantized dst scale");
    if (s.elements() > 0) {
        require(src, "src");
        if (quantized)
            require(quantized->values, "quantized dst values");
        else
            require(dst, "dst");
    }
    const int threads = threads_or_default(num_threads);
    const auto channels = static_cast<size_t>(s.channels);
    std::vector<double> m(channels), v(channels);
    // the int8 copy's steps and the quantized dst's scale come from the ranges
    const bool ranges = centered || quantized;
    std::vector<detail::channel_range> range(ranges ? channels : 0);
    if (known) {
        for (size_t c = 0; c < channels; ++c) {
            m[c] = known->mean[c], v[c] = known->variance[c];
            if (ranges) range[c] = {known->range[2 * c], known->range[2 * c + 1]};
        }
    } else if (d.batch_statistics) {
        detail::channel_statistics(src, s, m.data(), v.data(), ranges ? range.data() : nullptr,
                                   threads);
    } else {
        for (size_t c = 0; c < channels; ++c)
            m[c] = running_mean[c], v[c] = running_var[c];
    }
    std::vector<float> scale(channels), shift(channels), inv_step(centered ? channels : 0);
    for (size_t c = 0; c < channels; ++c) {
        // as torch: the inverse standard deviation in double, rounded once
        const float inv = static_cast<float>(1.0 / std::sqrt(v[c] + d.epsilon));
        mean[c] = static_cast<float>(m[c]);
        invstd[c] = inv;
        if (batch_var && d.batch_statistics) batch_var[c] = static_cast<float>(v[c]);
        scale[c] = inv * (gamma ? gamma[c] : 1.0f);
        shift[c] = (beta ? beta[c] : 0.0f) - mean[c] * scale[c];
        if (centered) {
            const quant_scale q = centering_scale(range[c], mean[c]);
            step[c] = q.scale;
            inv_step[c] = q.inv;
        }
    }
    const detail::centered_s8_writer keep{centered, mean, inv_step.data()};
    // max |dst| (where wanted: returned, or the quantized dst's scale):
    // from the ranges where no residual is added, else found in the apply pass
    const float peak = s.elements() > 0 && ranges && !residual && (dst_abs_max || quantized)
                               ? dst_abs_max_from_ranges(range, scale, shift, d.relu)
                               : 0.0f;
    float found = 0.0f;
    detail::quantized_s8_writer rounded{nullptr, quant_scale_from_abs_max(peak)};
    if (quantized) {
        rounded.values = quantized->values;
        *quantized->scale = rounded.scale.scale;
    }
    if (s.elements() > 0)
        detail::scale_shift_relu(src, s, scale.data(), shift.data(), residual, dst,
                                 d.relu ? mask : nullptr, centered ? &keep : nullptr,
                                 quantized ? &rounded : nullptr,
                                 dst_abs_max && residual ? &found : nullptr, threads);
    if (dst_abs_max) *dst_abs_max = residual ? found : peak;
}

void backward(const batch_norm_relu_desc &d, const float *diff_dst, const uint8_t *mask,
              detail::centered_source src, const float *gamma, const float *invstd, float *diff_src,
              float *diff_residual, float *diff_gamma, float *diff_beta, float *diff_src_abs_max,
              int num_threads, float *coefficients = nullptr) {
    const detail::channel_planes s = checked_planes(d);
    require(invstd, "invstd");
    if (d.relu) require(mask, "mask");
    if (s.elements() > 0) require(diff_dst, "diff_dst");
    if (diff_src_abs_max) {
        if (!diff_src && !coefficients)
            throw std::invalid_argument(
                    "batch_norm backward: diff_src_channel_abs_max needs diff_src (the maxima "
                    "are of diff_src)");
        std::fill(diff_src_abs_max, diff_src_abs_max + s.channels, 0.0f); // an empty tensor
    }
    const int threads = threads_or_default(num_threads);
    const auto channels = static_cast<size_t>(s.channels);
    const uint8_t *bits = d.relu ? mask : nullptr;
    // the sums feed diff_src (with batch statistics) and the affine gradients
    const bool need_sums =
            ((diff_src || coefficients) && d.batch_statistics) || diff_gamma || diff_beta;
    std::vector<double> sum_g(channels, 0.0), dot(channels, 0.0);
    if (need_sums && s.elements() > 0)
        detail::masked_gradient_sums(diff_dst, bits, src, s, sum_g.data(), dot.data(), threads);
    for (size_t c = 0; c < channels; ++c) {
        if (diff_gamma) diff_gamma[c] = static_cast<float>(dot[c] * invstd[c]);
        if (diff_beta) diff_beta[c] = static_cast<float>(sum_g[c]);
    }
    if ((!diff_src && !diff_residual && !coefficients) || s.elements() == 0) {
        if (coefficients) std::fill(coefficients, coefficients + 3 * s.channels, 0.0f);
        return;
    }
    std::vector<float> a(channels), b(channels, 0.0f), k(channels, 0.0f);
    const double count = static_cast<double>(s.batch) * static_cast<double>(s.spatial);
    for (size_t c = 0; c < channels; ++c) {
        const float w = gamma ? gamma[c] : 1.0f;
        a[c] = invstd[c] * w;
        if (d.batch_statistics) {
            // torch's training backward: (g - (x - mean) * dot * invstd^2 / M
            // - sum / M) * invstd * gamma, with M = N * H * W
            const double inv = invstd[c];
            b[c] = static_cast<float>(-dot[c] * inv * inv / count * a[c]);
            k[c] = static_cast<float>(-sum_g[c] / count * a[c]);
        }
    }
    if (coefficients) {
        std::copy(a.begin(), a.end(), coefficients);
        std::copy(b.begin(), b.end(), coefficients + s.channels);
        std::copy(k.begin(), k.end(), coefficients + 2 * s.channels);
    }
    if (diff_src || diff_residual || diff_src_abs_max)
        detail::masked_gradient_apply(diff_dst, bits, src, s, a.data(), b.data(), k.data(),
                                      diff_src, diff_residual, diff_src_abs_max, threads);
}

} // namespace

void batch_norm_relu_forward(const batch_norm_relu_desc &d, const float *src, const float *gamma,
                             const float *beta, const float *running_mean, const float *running_var,
                             float *dst, uint8_t *mask, float *mean, float *invstd,
                             float *batch_var, int num_threads,
                             const batch_norm_known_statistics *known) {
    forward(d, src, nullptr, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, nullptr, nullptr, nullptr, num_threads, known);
}

void batch_norm_relu_forward(const batch_norm_relu_desc &d, const float *src, const float *gamma,
                             const float *beta, const float *running_mean, const float *running_var,
                             float *dst, uint8_t *mask, float *mean, float *invstd,
                             float *batch_var, int8_t *centered, float *step, float *dst_abs_max,
                             int num_threads, const batch_norm_known_statistics *known) {
    require_int8_copy(d, centered, step);
    forward(d, src, nullptr, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, centered, step, dst_abs_max, num_threads, known);
}

void batch_norm_relu_forward_quantized(const batch_norm_relu_desc &d, const float *src,
                                       const float *gamma, const float *beta,
                                       const batch_norm_quantized_dst &dst, uint8_t *mask,
                                       float *mean, float *invstd, float *batch_var,
                                       int8_t *centered, float *step, int num_threads,
                                       const batch_norm_known_statistics *known) {
    require_int8_copy(d, centered, step);
    forward(d, src, nullptr, gamma, beta, nullptr, nullptr, nullptr, mask, mean, invstd, batch_var,
            centered, step, nullptr, num_threads, known, &dst);
}

void batch_norm_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                              const uint8_t *mask, const float *src, const float *gamma,
                              const float *mean, const float *invstd, float *diff_src,
                              float *diff_gamma, float *diff_beta, int num_threads) {
    backward(d, diff_dst, mask, f32_source(d, src, mean), gamma, invstd, diff_src, nullptr,
             diff_gamma, diff_beta, nullptr, num_threads);
}

void batch_norm_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                              const uint8_t *mask, const int8_t *centered, const float *step,
                              const float *gamma, const float *invstd, float *diff_src,
                              float *diff_gamma, float *diff_beta, float *diff_src_channel_abs_max,
                              int num_threads) {
    backward(d, diff_dst, mask, s8_source(d, centered, step), gamma, invstd, diff_src, nullptr,
             diff_gamma, diff_beta, diff_src_channel_abs_max, num_threads);
}

void batch_norm_relu_backward_coefficients(const batch_norm_relu_desc &d, const float *diff_dst,
                                           const uint8_t *mask, const int8_t *centered,
                                           const float *step, const float *gamma,
                                           const float *invstd, float *coefficients,
                                           float *diff_residual, float *diff_gamma,
                                           float *diff_beta, float *diff_src_channel_abs_max,
                                           int num_threads) {
    require(coefficients, "coefficients");
    backward(d, diff_dst, mask, s8_source(d, centered, step), gamma, invstd, nullptr, diff_residual,
             diff_gamma, diff_beta, diff_src_channel_abs_max, num_threads, coefficients);
}

void batch_norm_add_relu_forward(const batch_norm_relu_desc &d, const float *src,
                                 const float *residual, const float *gamma, const float *beta,
                                 const float *running_mean, const float *running_var, float *dst,
                                 uint8_t *mask, float *mean, float *invstd, float *batch_var,
                                 int num_threads, const batch_norm_known_statistics *known) {
    if (d.batch > 0) require(residual, "residual");
    forward(d, src, residual, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, nullptr, nullptr, nullptr, num_threads, known);
}

void batch_norm_add_relu_forward(const batch_norm_relu_desc &d, const float *src,
                                 const float *residual, const float *gamma, const float *beta,
                                 const float *running_mean, const float *running_var, float *dst,
                                 uint8_t *mask, float *mean, float *invstd, float *batch_var,
                                 int8_t *centered, float *step, int num_threads,
                                 const batch_norm_known_statistics *known, float *dst_abs_max) {
    require_int8_copy(d, centered, step);
    if (d.batch > 0) require(residual, "residual");
    forward(d, src, residual, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, centered, step, dst_abs_max, num_threads, known);
}

void batch_norm_add_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                                  const uint8_t *mask, const float *src, const float *gamma,
                                  const float *mean, const float *invstd, float *diff_src,
                                  float *diff_residual, float *diff_gamma, float *diff_beta,
                                  int num_threads) {
    backward(d, diff_dst, mask, f32_source(d, src, mean), gamma, invstd, diff_src, diff_residual,
             diff_gamma, diff_beta, nullptr, num_threads);
}

void batch_norm_add_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                                  const uint8_t *mask, const int8_t *centered, const float *step,
                                  const float *gamma, const float *invstd, float *diff_src,
                                  float *diff_residual, float *diff_gamma, float *diff_beta,
                                  float *diff_src_channel_abs_max, int num_threads) {
    backward(d, diff_dst, mask, s8_source(d, centered, step), gamma, invstd, diff_src,
             diff_residual, diff_gamma, diff_beta, diff_src_channel_abs_max, num_threads);
}

} // namespace qsp
