#include "primitives/passes/batch_norm.hpp"

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

// Portable C++ (the compiler's baseline vectors, no ISA target): the passes
// are memory bound, and run on every CPU the library does.
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

template <typename F> void with_centered(centered_source src, F &&f) {
    if (src.values)
        f(s8_centered{src.values, src.step});
    else
        f(f32_centered{src.src, src.mean});
}

// Folds the smallest and largest of p[0, n) into lowest / highest. Lanes
// of their own with selects written as minps / maxps compute them: GCC
// leaves an `omp simd reduction(min/max)` over floats scalar (NaN rules).
inline void plane_range(const float *p, int64_t n, float &lowest, float &highest) {
    constexpr int lanes = 8;
    float lo[lanes], hi[lanes];
    for (int j = 0; j < lanes; ++j)
        lo[j] = lowest, hi[j] = highest;
    int64_t i = 0;
    for (; i + lanes <= n; i += lanes)
        for (int j = 0; j < lanes; ++j) {
            const float v = p[i + j];
            lo[j] = v < lo[j] ? v : lo[j];
            hi[j] = v > hi[j] ? v : hi[j];
        }
    for (; i < n; ++i) {
        lo[0] = p[i] < lo[0] ? p[i] : lo[0];
        hi[0] = p[i] > hi[0] ? p[i] : hi[0];
    }
    for (int j = 0; j < lanes; ++j) {
        lowest = lo[j] < lowest ? lo[j] : lowest;
        highest = hi[j] > highest ? hi[j] : highest;
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
    // twice a 28 x 28 one's.
    const int64_t planes_per_part = std::max<int64_t>(1, 512 / s.spatial);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < s.channels; ++c) {
        double count = 0, m = 0, m2 = 0;
        float lowest = std::numeric_limits<float>::infinity(), highest = -lowest;
        for (int64_t n0 = 0; n0 < s.batch; n0 += planes_per_part) {
            const int64_t n1 = std::min(s.batch, n0 + planes_per_part);
            const auto plane = [&](int64_t n) { return src + (n * s.channels + c) * s.spatial; };
            float acc[sum_lanes] = {};
            for (int64_t n = n0; n < n1; ++n) {
                const float *p = plane(n);
                lane_accumulate(acc, s.spatial, [p](int64_t i) { return p[i]; });
                if (range) { // a loop of its own: the sum's order stays the one without it
                    plane_range(p, s.spatial, lowest, highest);
                }
            }
            const double nb = static_cast<double>((n1 - n0) * s.spatial);
            const double part_mean = static_cast<double>(lanes_total(acc)) / nb;
            const float centre = static_cast<float>(part_mean);
            float sq[sum_lanes] = {};
            for (int64_t n = n0; n < n1; ++n) {
                const float *p = plane(n);
                lane_accumulate(sq, s.spatial, [p, centre](int64_t i) {
                    return (p[i] - centre) * (p[i] - centre);
                });
            }
            // about part_mean rather than the float it was rounded to
            const double off = part_mean - centre;
            const double part_m2 = static_cast<double>(lanes_total(sq)) - nb * off * off;
            const double total = count + nb;
            const double delta = part_mean - m;
            m += delta * nb / total;
            m2 += std::max(0.0, part_m2) + delta * delta * count * nb / total;
            count = total;
        }
        mean[c] = m;
        var[c] = count > 0 ? m2 / count : 0.0;
        if (range) range[c] = {lowest, highest};
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
    with_centered(src, [&](auto centered) {
#pragma omp parallel num_threads(num_threads)
        {
            // the masked gradient of one plane, while it is in cache
            std::vector<float> masked(bits ? static_cast<size_t>(s.spatial) : 0);
#pragma omp for schedule(static)
            for (int64_t c = 0; c < s.channels; ++c) {
                double total = 0, total_centered = 0;
                const auto x = centered.at(c);
                for (int64_t n = 0; n < s.batch; ++n) {
                    const int64_t base = (n * s.channels + c) * s.spatial;
                    const float *g = diff_dst + base;
                    if (bits) {
                        // a select, not a product: a NaN gradient where the
                        // input was <= 0 is dropped, as torch's ReLU backward does
                        relu_mask_backward_range(g, bits, base, masked.data(), s.spatial);
                        g = masked.data();
                    }
                    float sum = 0, dot = 0;
#pragma omp simd reduction(+ : sum, dot)
                    for (int64_t i = 0; i < s.spatial; ++i) {
                        sum += g[i];
                        dot += g[i] * x(base + i);
                    }
                    total += sum;
                    total_centered += dot;
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
            const float *g = diff_dst;
            // the masked gradient first, while the chunk is in cache: into
            // the residual's gradient (which it is), else into diff_src
            float *masked = diff_residual ? diff_residual : diff_src;
            if (bits) {
                relu_mask_backward_range(diff_dst + begin, bits, begin, masked + begin,
                                         end - begin);
                g = masked;
            } else if (diff_residual) {
                std::copy(diff_dst + begin, diff_dst + end, diff_residual + begin);
            }
            if (!diff_src) return;
            for_each_plane_run(s, begin, end, [&](int64_t c, int64_t lo, int64_t hi) {
                const float ac = a[c], bc = b[c], kc = k[c];
                const auto x = centered.at(c);
#pragma omp simd
                for (int64_t i = lo; i < hi; ++i)
                    diff_src[i] = g[i] * ac + x(i) * bc + kc;
            });
        });
    });
}

} // namespace qsp::detail

// The public entry points (qsparseprop/primitives.hpp): argument checks,
// the per-channel arithmetic, then the passes.
namespace qsp {

namespace {

int threads_or_default(int num_threads) {
    return num_threads > 0 ? num_threads : omp_get_max_threads();
}

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
    if (p == nullptr)
        throw std::invalid_argument(std::string("batch_norm_relu: ") + name + " is null");
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
