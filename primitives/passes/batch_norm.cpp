#include "primitives/passes/batch_norm.hpp"

#include "primitives/passes/entry_arguments.hpp"

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

// Portable C++ (no ISA target: the passes are memory bound and run on every
// CPU the library does), with SSE2 intrinsics, part of x86-64 itself, where
// GCC's vectoriser left a loop scalar or a masked copy in between.
namespace qsp::detail {

namespace {

// Whole mask bytes per OpenMP chunk, so no two threads write one byte.
constexpr int64_t chunk_elems = 8 * 4096;

// Calls f(channel, begin, end) for the runs of one plane in [begin, end).
template <typename F> void for_each_plane_run(channel_planes s, int64_t begin, int64_t end, F &&f) {
    for (int64_t i = begin; i < end;) {
        const int64_t plane = i / s.spatial;
        const int64_t run_end = std::min(end, (plane + 1) * s.spatial);
        f(plane % s.channels, i, run_end);
        i = run_end;
    }
}

template <typename F> void for_each_chunk(int64_t n, int num_threads, F &&f) {
    const int64_t chunks = (n + chunk_elems - 1) / chunk_elems;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < chunks; ++c)
        f(c * chunk_elems, std::min(n, (c + 1) * chunk_elems));
}

// Rounded half to even by the float adder (1.5 * 2^23 + v has a unit ulp;
// std::nearbyint would be a libm call per element on the baseline ISA).
// No clamp: with a usable step, |src - mean| <= max |src - mean| = 127 *
// step, so |v| <= 127 * (1 + 3 ulp) < 127.5 rounds into [-127, 127]; a
// channel without a usable step is written as zeros by the caller.
inline int8_t round_to_s8(float v) {
    constexpr float unit_ulp = 12582912.0f;
    return static_cast<int8_t>(static_cast<int>((v + unit_ulp) - unit_ulp));
}

// The int8 copy of channel c's run [b, e) of src (zeros where the channel
// has no usable step). Locals, not references into `keep`: an int8 store
// may alias anything, so those would be reloaded per element.
inline void write_centered(const centered_s8_writer &keep, const float *src, int64_t c, int64_t b,
                           int64_t e) {
    int8_t *q = keep.values;
    const float m = keep.mean[c], inv = keep.inv[c];
    if (inv == 0.0f) {
        std::fill(q + b, q + e, int8_t{0});
        return;
    }
#pragma omp simd
    for (int64_t i = b; i < e; ++i)
        q[i] = round_to_s8((src[i] - m) * inv);
}

// src - mean[c] as the backward reads it, element i of channel c's runs
// (flat indices): from the forward's src, or from its int8 copy.
struct f32_centered {
    const float *src, *mean;
    struct channel {
        const float *x;
        float m;
        float operator()(int64_t i) const { return x[i] - m; }
    };
    channel at(int64_t c) const { return {src, mean[c]}; }
};

struct s8_centered {
    const int8_t *values;
    const float *step;
    struct channel {
        const int8_t *q;
        float f;
        float operator()(int64_t i) const { return static_cast<float>(q[i]) * f; }
    };
    channel at(int64_t c) const { return {values, step[c]}; }
};

// src - mean of channel x at elements i..i+7, as two vectors of 4.
struct lanes8 {
    __m128 lo, hi;
};
inline lanes8 centered8(const f32_centered::channel &x, int64_t i) {
    const __m128 m = _mm_set1_ps(x.m);
    return {_mm_sub_ps(_mm_loadu_ps(x.x + i), m), _mm_sub_ps(_mm_loadu_ps(x.x + i + 4), m)};
}
inline lanes8 centered8(const s8_centered::channel &x, int64_t i) {
    // 8 int8 widened by unpacking with themselves and arithmetic shifts
    // (SSE2 has no sign extension)
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(x.q + i));
    const __m128i w = _mm_srai_epi16(_mm_unpacklo_epi8(b, b), 8);
    const __m128 f = _mm_set1_ps(x.f);
    return {_mm_mul_ps(_mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(w, w), 16)), f),
            _mm_mul_ps(_mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpackhi_epi16(w, w), 16)), f)};
}
inline float lanes_sum(__m128 v) {
    alignas(16) float l[4];
    _mm_store_ps(l, v);
    return (l[0] + l[1]) + (l[2] + l[3]);
}

template <typename F> void with_centered(centered_source src, F &&f) {
    if (src.values)
        f(s8_centered{src.values, src.step});
    else
        f(f32_centered{src.src, src.mean});
}

// Folds the smallest and largest of p[0, n) into lowest / highest (a NaN
// is skipped). SSE2's minps / maxps are exactly the selects `v < lo ? v :
// lo` and `v > hi ? v : hi` (the second operand when unordered); GCC left
// those selects scalar, the statistics pass's largest cost
// (128x24x28x28, 2 threads: 1.04 -> 0.59 ms).
inline void plane_range(const float *p, int64_t n, float &lowest, float &highest) {
    __m128 lo0 = _mm_set1_ps(lowest), lo1 = lo0, hi0 = _mm_set1_ps(highest), hi1 = hi0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128 a = _mm_loadu_ps(p + i), b = _mm_loadu_ps(p + i + 4);
        lo0 = _mm_min_ps(a, lo0), lo1 = _mm_min_ps(b, lo1);
        hi0 = _mm_max_ps(a, hi0), hi1 = _mm_max_ps(b, hi1);
    }
    for (; i < n; ++i) { // lane 0 only (min_ss takes the other lanes from v)
        const __m128 v = _mm_set_ss(p[i]);
        lo0 = _mm_move_ss(lo0, _mm_min_ss(v, lo0));
        hi0 = _mm_move_ss(hi0, _mm_max_ss(v, hi0));
    }
    alignas(16) float lanes[8];
    _mm_store_ps(lanes, _mm_min_ps(lo0, lo1));
    _mm_store_ps(lanes + 4, _mm_max_ps(hi0, hi1));
    for (int j = 0; j < 4; ++j) {
        lowest = lanes[j] < lowest ? lanes[j] : lowest;
        highest = lanes[4 + j] > highest ? lanes[4 + j] : highest;
    }
}

// Sums in 16 float lanes: four independent vector accumulators on the
// baseline ISA, where an `omp simd` reduction keeps one and the loop waits
// on the adder's latency (the plane is in cache). The lanes are added in a
// fixed order, so a sum depends on the shape alone. (The backward's two
// sums stay an omp simd reduction: in lanes they measured slower, 3.4 ->
// 3.9 ms at 128x24x28x28.)
constexpr int sum_lanes = 16;

// Adds f(i) over [0, n) into the lanes of acc (element i into lane i % 16).
template <typename F> void lane_accumulate(float (&acc)[sum_lanes], int64_t n, F f) {
    int64_t i = 0;
    for (; i + sum_lanes <= n; i += sum_lanes)
        for (int j = 0; j < sum_lanes; ++j)
            acc[j] += f(i + j);
    for (int j = 0; i < n; ++i, ++j)
        acc[j] += f(i);
}

inline float lanes_total(const float (&acc)[sum_lanes]) {
    float sum = 0;
    for (int j = 0; j < sum_lanes; ++j)
        sum += acc[j];
    return sum;
}

} // namespace

void channel_statistics(const float *src, channel_planes s, double *mean, double *var,
                        channel_range *range, int num_threads) {
    // Small planes (7 x 7, 14 x 14) are taken a few at a time, ~512
    // elements, as one part: the lane reductions and the double update
    // (two divisions) per plane had made a 7 x 7 plane's element cost
    // twice a 28 x 28 one's. A part is a run of images (all channels):
    // threads take whole parts and read them in memory order, one channel
    // after the other per image (a channel's planes alone are a stride of
    // C planes apart; the order made the pass 2-12 % faster); each
    // channel's sums still take its planes in image order, and the parts
    // are combined per channel in order, so neither depends on the thread
    // count.
    const int64_t planes_per_part = std::max<int64_t>(1, 512 / s.spatial);
    const int64_t parts = (s.batch + planes_per_part - 1) / planes_per_part;
    struct part_stats {
        double mean, m2, count;
        channel_range range;
    };
    std::vector<part_stats> stats(static_cast<size_t>(parts * s.channels));
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<float> acc(static_cast<size_t>(s.channels * sum_lanes));
        std::vector<float> centre(static_cast<size_t>(s.channels));
        const auto lanes_of = [&](int64_t c) -> float(&)[sum_lanes] {
            return *reinterpret_cast<float(*)[sum_lanes]>(acc.data() + c * sum_lanes);
        };
#pragma omp for schedule(static)
        for (int64_t k = 0; k < parts; ++k) {
            const int64_t n0 = k * planes_per_part, n1 = std::min(s.batch, n0 + planes_per_part);
            const double nb = static_cast<double>((n1 - n0) * s.spatial);
            part_stats *out = stats.data() + k * s.channels;
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t c = 0; c < s.channels; ++c)
                out[c].range = {std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity()};
            for (int64_t n = n0; n < n1; ++n)
                for (int64_t c = 0; c < s.channels; ++c) {
                    const float *p = src + (n * s.channels + c) * s.spatial;
                    lane_accumulate(lanes_of(c), s.spatial, [p](int64_t i) { return p[i]; });
                    if (range) { // a loop of its own: the sum's order stays the one without it
                        plane_range(p, s.spatial, out[c].range.lowest, out[c].range.highest);
                    }
                }
            for (int64_t c = 0; c < s.channels; ++c) {
                out[c].mean = static_cast<double>(lanes_total(lanes_of(c))) / nb;
                centre[static_cast<size_t>(c)] = static_cast<float>(out[c].mean);
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t n = n0; n < n1; ++n)
                for (int64_t c = 0; c < s.channels; ++c) {
                    const float *p = src + (n * s.channels + c) * s.spatial;
                    const float m = centre[static_cast<size_t>(c)];
                    lane_accumulate(lanes_of(c), s.spatial,
                                    [p, m](int64_t i) { return (p[i] - m) * (p[i] - m); });
                }
            for (int64_t c = 0; c < s.channels; ++c) {
                // about the part's mean rather than the float it was rounded to
                const double off = out[c].mean - centre[static_cast<size_t>(c)];
                out[c].m2 = static_cast<double>(lanes_total(lanes_of(c))) - nb * off * off;
                out[c].count = nb;
            }
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < s.channels; ++c) {
            double count = 0, m = 0, m2 = 0;
            float lowest = std::numeric_limits<float>::infinity(), highest = -lowest;
            for (int64_t k = 0; k < parts; ++k) {
                const part_stats &p = stats[static_cast<size_t>(k * s.channels + c)];
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
}

void scale_shift_relu(const float *src, channel_planes s, const float *scale, const float *shift,
                      const float *residual, float *dst, uint8_t *bits,
                      const centered_s8_writer *keep, int num_threads) {
    for_each_chunk(s.elements(), num_threads, [&](int64_t begin, int64_t end) {
        for_each_plane_run(s, begin, end, [&](int64_t c, int64_t b, int64_t e) {
            const float a = scale[c], k = shift[c];
            if (residual) { // the block's add: (normalised, rounded) + residual
                const float *in = src, *r = residual;
                float *out = dst;
                if (keep) write_centered(*keep, in, c, b, e);
#pragma omp simd
                for (int64_t i = b; i < e; ++i)
                    out[i] = (in[i] * a + k) + r[i];
                return;
            }
            if (keep && keep->inv[c] != 0.0f) { // the int8 copy first: dst may be src
                // locals, not the lambda's captures: an int8 store may alias
                // anything, so captured pointers would be reloaded per element
                // (and the loop not vectorized)
                const float *in = src;
                float *out = dst;
                int8_t *q = keep->values;
                const float m = keep->mean[c], inv = keep->inv[c];
#pragma omp simd
                for (int64_t i = b; i < e; ++i) {
                    const float v = in[i];
                    q[i] = round_to_s8((v - m) * inv);
                    out[i] = v * a + k;
                }
            } else {
                // a channel without a usable step (NaN, or all its values
                // equal): no number to keep, its copy is zeros
                if (keep) write_centered(*keep, src, c, b, e);
#pragma omp simd
                for (int64_t i = b; i < e; ++i)
                    dst[i] = src[i] * a + k;
            }
        });
        // while the chunk is in cache
        if (bits) relu_mask_range(dst, dst, bits, begin, end);
    });
}

void masked_gradient_sums(const float *diff_dst, const uint8_t *bits, centered_source src,
                          channel_planes s, double *sum_g, double *sum_g_centered,
                          int num_threads) {
    // Float sums per plane, read in memory order (threads take whole
    // images: a channel's planes alone are C planes apart), then added per
    // channel in double in image order: neither depends on the thread count.
    std::vector<float> plane_sums(static_cast<size_t>(2 * s.batch * s.channels));
    with_centered(src, [&](auto centered) {
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static)
            for (int64_t n = 0; n < s.batch; ++n)
                for (int64_t c = 0; c < s.channels; ++c) {
                    const auto x = centered.at(c);
                    const int64_t base = (n * s.channels + c) * s.spatial;
                    const float *g = diff_dst + base;
                    // 8 lanes, the ReLU's mask applied in registers (with a
                    // masked copy of the plane first, then the sums over it,
                    // the pass took 0.39 ms at 128x96x7x7, now 0.24)
                    __m128 sum0 = _mm_setzero_ps(), sum1 = sum0, dot0 = sum0, dot1 = sum0;
                    int64_t i = 0;
                    for (; i + 8 <= s.spatial; i += 8) {
                        __m128 g0 = _mm_loadu_ps(g + i), g1 = _mm_loadu_ps(g + i + 4);
                        if (bits) {
                            const mask_lanes m = relu_mask_lanes(bits, base + i);
                            g0 = _mm_and_ps(g0, m.lo), g1 = _mm_and_ps(g1, m.hi);
                        }
                        const lanes8 xc = centered8(x, base + i);
                        sum0 = _mm_add_ps(sum0, g0), sum1 = _mm_add_ps(sum1, g1);
                        dot0 = _mm_add_ps(dot0, _mm_mul_ps(g0, xc.lo));
                        dot1 = _mm_add_ps(dot1, _mm_mul_ps(g1, xc.hi));
                    }
                    float sum = lanes_sum(_mm_add_ps(sum0, sum1));
                    float dot = lanes_sum(_mm_add_ps(dot0, dot1));
                    for (; i < s.spatial; ++i) {
                        const int64_t bit = base + i;
                        // a select, not a product: a NaN gradient where the
                        // input was <= 0 is dropped, as torch's ReLU backward does
                        const float gi = !bits || relu_mask_bit(bits, bit) ? g[i] : 0.0f;
                        sum += gi;
                        dot += gi * x(base + i);
                    }
                    plane_sums[static_cast<size_t>(2 * (n * s.channels + c))] = sum;
                    plane_sums[static_cast<size_t>(2 * (n * s.channels + c) + 1)] = dot;
                }
#pragma omp for schedule(static)
            for (int64_t c = 0; c < s.channels; ++c) {
                double total = 0, total_centered = 0;
                for (int64_t n = 0; n < s.batch; ++n) {
                    total += plane_sums[static_cast<size_t>(2 * (n * s.channels + c))];
                    total_centered += plane_sums[static_cast<size_t>(2 * (n * s.channels + c) + 1)];
                }
                sum_g[c] = total;
                sum_g_centered[c] = total_centered;
            }
        }
    });
}

void masked_gradient_apply(const float *diff_dst, const uint8_t *bits, centered_source src,
                           channel_planes s, const float *a, const float *b, const float *k,
                           float *diff_src, float *diff_residual, int num_threads) {
    with_centered(src, [&](auto centered) {
        for_each_chunk(s.elements(), num_threads, [&](int64_t begin, int64_t end) {
            for_each_plane_run(s, begin, end, [&](int64_t c, int64_t lo, int64_t hi) {
                // g masked in registers (a masked copy first, read back,
                // cost a quarter of the pass), stored as the residual's
                // gradient (which it is) when wanted; then the gradient
                const auto x = centered.at(c);
                const float ac = a[c], bc = b[c], kc = k[c];
                const __m128 av = _mm_set1_ps(ac), bv = _mm_set1_ps(bc), kv = _mm_set1_ps(kc);
                // (g * a + x * b) + k, as the scalar tail rounds it
                const auto gradient = [&](__m128 g, __m128 xc) {
                    return _mm_add_ps(_mm_add_ps(_mm_mul_ps(g, av), _mm_mul_ps(xc, bv)), kv);
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
                    if (diff_src) { // may be diff_dst: these elements are read
                        const lanes8 xc = centered8(x, i);
                        _mm_storeu_ps(diff_src + i, gradient(g0, xc.lo));
                        _mm_storeu_ps(diff_src + i + 4, gradient(g1, xc.hi));
                    }
                }
                for (; i < hi; ++i) {
                    // a select, not a product: a NaN gradient where the
                    // input was <= 0 is dropped, as torch's ReLU backward does
                    const float g = !bits || relu_mask_bit(bits, i) ? diff_dst[i] : 0.0f;
                    if (diff_residual) diff_residual[i] = g;
                    if (diff_src) diff_src[i] = (g * ac + x(i) * bc) + kc;
                }
            });
        });
    });
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

void forward(const batch_norm_relu_desc &d, const float *src, const float *residual,
             const float *gamma, const float *beta, const float *running_mean,
             const float *running_var, float *dst, uint8_t *mask, float *mean, float *invstd,
             float *batch_var, int8_t *centered, float *step, int num_threads) {
    const detail::channel_planes s = checked_planes(d);
    require(mean, "mean");
    require(invstd, "invstd");
    if (d.relu) require(mask, "mask");
    if (!d.batch_statistics) {
        require(running_mean, "running_mean");
        require(running_var, "running_var");
    }
    if (s.elements() > 0) {
        require(src, "src");
        require(dst, "dst");
    }
    const int threads = threads_or_default(num_threads);
    const auto channels = static_cast<size_t>(s.channels);
    std::vector<double> m(channels), v(channels);
    std::vector<detail::channel_range> range(centered ? channels : 0);
    if (d.batch_statistics) {
        detail::channel_statistics(src, s, m.data(), v.data(), centered ? range.data() : nullptr,
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
    if (s.elements() > 0)
        detail::scale_shift_relu(src, s, scale.data(), shift.data(), residual, dst,
                                 d.relu ? mask : nullptr, centered ? &keep : nullptr, threads);
}

void backward(const batch_norm_relu_desc &d, const float *diff_dst, const uint8_t *mask,
              detail::centered_source src, const float *gamma, const float *invstd, float *diff_src,
              float *diff_residual, float *diff_gamma, float *diff_beta, int num_threads) {
    const detail::channel_planes s = checked_planes(d);
    require(invstd, "invstd");
    if (d.relu) require(mask, "mask");
    if (s.elements() > 0) require(diff_dst, "diff_dst");
    const int threads = threads_or_default(num_threads);
    const auto channels = static_cast<size_t>(s.channels);
    const uint8_t *bits = d.relu ? mask : nullptr;
    // the sums feed diff_src (with batch statistics) and the affine gradients
    const bool need_sums = (diff_src && d.batch_statistics) || diff_gamma || diff_beta;
    std::vector<double> sum_g(channels, 0.0), dot(channels, 0.0);
    if (need_sums && s.elements() > 0)
        detail::masked_gradient_sums(diff_dst, bits, src, s, sum_g.data(), dot.data(), threads);
    for (size_t c = 0; c < channels; ++c) {
        if (diff_gamma) diff_gamma[c] = static_cast<float>(dot[c] * invstd[c]);
        if (diff_beta) diff_beta[c] = static_cast<float>(sum_g[c]);
    }
    if ((!diff_src && !diff_residual) || s.elements() == 0) return;
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
    detail::masked_gradient_apply(diff_dst, bits, src, s, a.data(), b.data(), k.data(), diff_src,
                                  diff_residual, threads);
}

} // namespace

void batch_norm_relu_forward(const batch_norm_relu_desc &d, const float *src, const float *gamma,
                             const float *beta, const float *running_mean, const float *running_var,
                             float *dst, uint8_t *mask, float *mean, float *invstd,
                             float *batch_var, int num_threads) {
    forward(d, src, nullptr, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, nullptr, nullptr, num_threads);
}

void batch_norm_relu_forward(const batch_norm_relu_desc &d, const float *src, const float *gamma,
                             const float *beta, const float *running_mean, const float *running_var,
                             float *dst, uint8_t *mask, float *mean, float *invstd,
                             float *batch_var, int8_t *centered, float *step, int num_threads) {
    require_int8_copy(d, centered, step);
    forward(d, src, nullptr, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, centered, step, num_threads);
}

void batch_norm_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                              const uint8_t *mask, const float *src, const float *gamma,
                              const float *mean, const float *invstd, float *diff_src,
                              float *diff_gamma, float *diff_beta, int num_threads) {
    backward(d, diff_dst, mask, f32_source(d, src, mean), gamma, invstd, diff_src, nullptr,
             diff_gamma, diff_beta, num_threads);
}

void batch_norm_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                              const uint8_t *mask, const int8_t *centered, const float *step,
                              const float *gamma, const float *invstd, float *diff_src,
                              float *diff_gamma, float *diff_beta, int num_threads) {
    backward(d, diff_dst, mask, s8_source(d, centered, step), gamma, invstd, diff_src, nullptr,
             diff_gamma, diff_beta, num_threads);
}

void batch_norm_add_relu_forward(const batch_norm_relu_desc &d, const float *src,
                                 const float *residual, const float *gamma, const float *beta,
                                 const float *running_mean, const float *running_var, float *dst,
                                 uint8_t *mask, float *mean, float *invstd, float *batch_var,
                                 int num_threads) {
    if (d.batch > 0) require(residual, "residual");
    forward(d, src, residual, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, nullptr, nullptr, num_threads);
}

void batch_norm_add_relu_forward(const batch_norm_relu_desc &d, const float *src,
                                 const float *residual, const float *gamma, const float *beta,
                                 const float *running_mean, const float *running_var, float *dst,
                                 uint8_t *mask, float *mean, float *invstd, float *batch_var,
                                 int8_t *centered, float *step, int num_threads) {
    require_int8_copy(d, centered, step);
    if (d.batch > 0) require(residual, "residual");
    forward(d, src, residual, gamma, beta, running_mean, running_var, dst, mask, mean, invstd,
            batch_var, centered, step, num_threads);
}

void batch_norm_add_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                                  const uint8_t *mask, const float *src, const float *gamma,
                                  const float *mean, const float *invstd, float *diff_src,
                                  float *diff_residual, float *diff_gamma, float *diff_beta,
                                  int num_threads) {
    backward(d, diff_dst, mask, f32_source(d, src, mean), gamma, invstd, diff_src, diff_residual,
             diff_gamma, diff_beta, num_threads);
}

void batch_norm_add_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                                  const uint8_t *mask, const int8_t *centered, const float *step,
                                  const float *gamma, const float *invstd, float *diff_src,
                                  float *diff_residual, float *diff_gamma, float *diff_beta,
                                  int num_threads) {
    backward(d, diff_dst, mask, s8_source(d, centered, step), gamma, invstd, diff_src,
             diff_residual, diff_gamma, diff_beta, num_threads);
}

} // namespace qsp
