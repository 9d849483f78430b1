// How the BatchNorm passes walk a tensor (which thread takes which images
// or chunks, the order sums are taken and combined in), written once for
// every tier: each pass is a template over its tier's kernels — the loops
// over one plane or one run of a plane — so the tiers differ in those loops
// only, and since every kernel keeps the portable one's lanes and order,
// in speed only. Included by batch_norm.cpp (the portable kernels) and
// batch_norm_avx2.cpp; the drivers are compiled for the baseline ISA and
// call the kernels per plane or run.
//
// A tier's kernels K provide (static members; "lane j" sums element i of a
// plane when i % 16 == j, each lane in element order):
//   accumulate(acc, p, n)            acc[i % 16] += p[i]
//   accumulate_squares(acc, p, n, m) acc[i % 16] += (p[i] - m) * (p[i] - m)
//   accumulate_range(acc, p, n, lowest, highest)  accumulate, and folds
//       min / max of p (a NaN skipped) in the same lanes, the tail in lane
//       0, the lanes folded by fold_range
//   scale_shift(in, out, b, e, a, k)              out = in * a + k
//   scale_shift_add(in, r, out, b, e, a, k)       out = (in * a + k) + r
//   scale_shift_keep(in, out, q, b, e, a, k, m, inv)  the same as
//       scale_shift plus q = round-half-even((in - m) * inv)
//   write_centered(in, q, b, e, m, inv)           q alone
//   quantize(in, q, b, e, inv)                    q = round-half-even(in * inv),
//       clamped to [-127, 127] (clamp_to_s8_range)
//   abs_max(p, b, e)                              max |p[i]| over [b, e), NaN if one is
//   relu_range(dst, bits, begin, end)             relu_mask_range's contract
//   gradient_sums(g, bits, base, x, n, sum, dot)  over one plane (g and x
//       from element `base`): sum = Σ g', dot = Σ g' * x(i), g' the masked
//       g, in the 16 sum lanes over whole vectors of 16 (element i in lane
//       i % 16), the lanes added as a tree (lane j + lane j+8, then j +
//       j+4, then (0 + 1) + (2 + 3): a register's halves added in turn),
//       then the scalar tail (gradient_sums_tail)
//   gradient_apply(dd, bits, x, lo, hi, a, b, k, ds, dr, mx)  elements
//       [lo, hi) of one channel: g' masked; dr = g'; ds = (g' * a + x * b)
//       + k; with mx, *mx = max |ds| over the run, NaN if one is (exact: the
//       same float in any lane order)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <omp.h>

#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/relu_mask.hpp"

namespace qsp::detail::batch_norm_walk {

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

// v clamped to [-127, 127], a NaN to -127 (as max(v, -127) with the limit
// second, which every vector tier computes): the quantized dst's rounding
// stays in range where a caller's statistics understate the output.
inline float clamp_to_s8_range(float v) {
    v = v > -127.0f ? v : -127.0f;
    return v < 127.0f ? v : 127.0f;
}

// src - mean[c] as the backward reads it, element i of channel c's runs
// (flat indices): from the forward's src, or from its int8 copy.
struct f32_centered {
    const float *src, *mean;
    struct channel {
        const float *x;
        float m;
        float operator()(int64_t i) const { return x[i] - m; }
        channel shifted(int64_t by) const { return {x + by, m}; }
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
        channel shifted(int64_t by) const { return {q + by, f}; }
    };
    channel at(int64_t c) const { return {values, step[c]}; }
};

template <typename F> void with_centered(centered_source src, F &&f) {
    if (src.values)
        f(s8_centered{src.values, src.step});
    else
        f(f32_centered{src.src, src.mean});
}

// A range's 8 lanes after its registers' fold (lanes[0..3] the minima,
// lanes[4..7] the maxima) folded into lowest / highest, in lane order.
inline void fold_range(const float (&lanes)[8], float &lowest, float &highest) {
    for (int j = 0; j < 4; ++j) {
        lowest = lanes[j] < lowest ? lanes[j] : lowest;
        highest = lanes[4 + j] > highest ? lanes[4 + j] : highest;
    }
}

// Sums in 16 float lanes (four independent vector accumulators on the
// baseline ISA, where an `omp simd` reduction keeps one and the loop waits
// on the adder's latency); the lanes are added in a fixed order, so a sum
// depends on the shape alone.
constexpr int sum_lanes = 16;

inline float lanes_total(const float (&acc)[sum_lanes]) {
    float sum = 0;
    for (int j = 0; j < sum_lanes; ++j)
        sum += acc[j];
    return sum;
}

// The scalar tail of gradient_sums, elements [i, end), the same in every
// tier, after the lanes' tree. The mask is a select, not a product: a NaN
// gradient where the ReLU was off is dropped, as torch's ReLU backward does.
// (The tail into the lanes before the tree would be one rule fewer, but a
// vector reload of lanes just stored one by one waits on the store buffer:
// 7 x 7 planes took a tenth longer.)
template <typename X>
void gradient_sums_tail(const float *g, const uint8_t *bits, int64_t base, const X &x, int64_t i,
                        int64_t end, float &sum, float &dot) {
    for (; i < end; ++i) {
        const float gi = !bits || relu_mask_bit(bits, base + i) ? g[i] : 0.0f;
        sum += gi;
        dot += gi * x(base + i);
    }
}
// A maximum that stays NaN once a NaN entered it.
inline float fold_abs_max(float folded, float v) {
    return folded != folded || v != v ? std::numeric_limits<float>::quiet_NaN()
                                      : std::max(folded, v);
}

// The tail, its maximum folded into *abs_max (the vector part's, when
// wanted; diff_src written when given).
template <typename X>
void gradient_apply_tail(const float *diff_dst, const uint8_t *bits, const X &x, int64_t i,
                         int64_t end, float a, float b, float k, float *diff_src,
                         float *diff_residual, float *abs_max) {
    for (; i < end; ++i) {
        const float g = !bits || relu_mask_bit(bits, i) ? diff_dst[i] : 0.0f;
        if (diff_residual) diff_residual[i] = g;
        if (!diff_src && !abs_max) continue;
        const float d = (g * a + x(i) * b) + k;
        if (diff_src) diff_src[i] = d;
        if (abs_max) *abs_max = fold_abs_max(*abs_max, std::fabs(d));
    }
}

template <typename K>
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
    std::vector<statistics_part> stats(static_cast<size_t>(parts * s.channels));
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
            statistics_part *out = stats.data() + k * s.channels;
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t c = 0; c < s.channels; ++c)
                out[c].range = {std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity()};
            for (int64_t n = n0; n < n1; ++n)
                for (int64_t c = 0; c < s.channels; ++c) {
                    const float *p = src + (n * s.channels + c) * s.spatial;
                    if (range) // the same sums, in the same order, as accumulate's
                        K::accumulate_range(lanes_of(c), p, s.spatial, out[c].range.lowest,
                                            out[c].range.highest);
                    else
                        K::accumulate(lanes_of(c), p, s.spatial);
                }
            for (int64_t c = 0; c < s.channels; ++c) {
                out[c].mean = static_cast<double>(lanes_total(lanes_of(c))) / nb;
                centre[static_cast<size_t>(c)] = static_cast<float>(out[c].mean);
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t n = n0; n < n1; ++n)
                for (int64_t c = 0; c < s.channels; ++c)
                    K::accumulate_squares(lanes_of(c), src + (n * s.channels + c) * s.spatial,
                                          s.spatial, centre[static_cast<size_t>(c)]);
            for (int64_t c = 0; c < s.channels; ++c) {
                // about the part's mean rather than the float it was rounded to
                const double off = out[c].mean - centre[static_cast<size_t>(c)];
                out[c].m2 = static_cast<double>(lanes_total(lanes_of(c))) - nb * off * off;
                out[c].count = nb;
            }
        }
    }
    channel_statistics_from_parts(stats.data(), parts, s.channels, 1, mean, var, range,
                                  num_threads);
}

// The piece of dst a quantized apply makes in a thread's buffer before
// rounding it: 16 KB, in L1 from its writing to its rounding (whole mask
// bytes, as relu_range needs).
constexpr int64_t quantized_piece_elems = 4096;

template <typename K>
void scale_shift_relu(const float *src, channel_planes s, const float *scale, const float *shift,
                      const float *residual, float *dst, uint8_t *bits,
                      const centered_s8_writer *keep, const quantized_s8_writer *quantized,
                      float *dst_abs_max, int num_threads) {
    const int threads = std::max(1, num_threads);
    std::vector<float> buffers(quantized ? static_cast<size_t>(threads * quantized_piece_elems)
                                         : 0);
    std::vector<float> peaks(dst_abs_max ? static_cast<size_t>(threads) : 0, 0.0f);
    for_each_chunk(s.elements(), threads, [&](int64_t begin, int64_t end) {
        const int64_t piece = quantized ? quantized_piece_elems : end - begin;
        for (int64_t pb = begin; pb < end; pb += piece) {
            const int64_t pe = std::min(end, pb + piece);
            // out[i] for i in [pb, pe): dst, or the thread's buffer (indexed
            // by the element, as the kernels index src)
            float *out = dst;
            if (quantized) out = buffers.data() + omp_get_thread_num() * quantized_piece_elems - pb;
            for_each_plane_run(s, pb, pe, [&](int64_t c, int64_t b, int64_t e) {
                const float a = scale[c], k = shift[c];
                const bool usable = keep && keep->inv[c] != 0.0f;
                if (residual) { // the block's add: (normalised, rounded) + residual
                    if (usable)
                        K::write_centered(src, keep->values, b, e, keep->mean[c], keep->inv[c]);
                    else if (keep) // no usable step (NaN, or all values equal): zeros
                        std::fill(keep->values + b, keep->values + e, int8_t{0});
                    K::scale_shift_add(src, residual, out, b, e, a, k);
                } else if (usable) { // the int8 copy in the same loop: dst may be src
                    K::scale_shift_keep(src, out, keep->values, b, e, a, k, keep->mean[c],
                                        keep->inv[c]);
                } else {
                    if (keep) std::fill(keep->values + b, keep->values + e, int8_t{0});
                    K::scale_shift(src, out, b, e, a, k);
                }
            });
            // while the piece is in cache
            if (bits) K::relu_range(out, bits, pb, pe);
            if (dst_abs_max) {
                float &peak = peaks[static_cast<size_t>(omp_get_thread_num())];
                peak = fold_abs_max(peak, K::abs_max(out, pb, pe));
            }
            if (!quantized) continue;
            if (quantized->scale.usable)
                K::quantize(out, quantized->values, pb, pe, quantized->scale.inv);
            else
                std::fill(quantized->values + pb, quantized->values + pe, int8_t{0});
        }
    });
    if (!dst_abs_max) return;
    float peak = 0.0f; // a maximum is exact: the same in any fold order
    for (float p : peaks)
        peak = fold_abs_max(peak, p);
    *dst_abs_max = peak;
}

template <typename K>
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
                    const int64_t base = (n * s.channels + c) * s.spatial;
                    const size_t at = static_cast<size_t>(2 * (n * s.channels + c));
                    K::gradient_sums(diff_dst + base, bits, base, centered.at(c), s.spatial,
                                     plane_sums[at], plane_sums[at + 1]);
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

template <typename K>
void masked_gradient_apply(const float *diff_dst, const uint8_t *bits, centered_source src,
                           channel_planes s, const float *a, const float *b, const float *k,
                           float *diff_src, float *diff_residual, float *channel_abs_max,
                           int num_threads) {
    // the maxima of each run, taken in registers as it is written, per
    // thread and channel, then folded per channel (a maximum is exact: the result
    // does not depend on the thread count)
    const int threads = std::max(1, num_threads);
    std::vector<float> partial(static_cast<size_t>(channel_abs_max ? threads * s.channels : 0),
                               0.0f);
    with_centered(src, [&](auto centered) {
        for_each_chunk(s.elements(), threads, [&](int64_t begin, int64_t end) {
            float *mine =
                    partial.empty() ? nullptr : partial.data() + omp_get_thread_num() * s.channels;
            for_each_plane_run(s, begin, end, [&](int64_t c, int64_t lo, int64_t hi) {
                float run_max = 0.0f;
                K::gradient_apply(diff_dst, bits, centered.at(c), lo, hi, a[c], b[c], k[c],
                                  diff_src, diff_residual, mine ? &run_max : nullptr);
                if (mine) mine[c] = fold_abs_max(mine[c], run_max);
            });
        });
    });
    if (partial.empty()) return;
    for (int64_t c = 0; c < s.channels; ++c) {
        float m = 0.0f;
        for (int t = 0; t < threads; ++t)
            m = fold_abs_max(m, partial[static_cast<size_t>(t * s.channels + c)]);
        channel_abs_max[c] = m;
    }
}

template <typename K>
void quantize_pair_from_gradient(const batch_norm_gradient &src, const float *multiplier,
                                 const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain,
                                 int num_threads) {
    // dY a chunk at a time into this thread's buffer (in L2), by the apply
    // pass's own kernel, then rounded run by run from there: the integers
    // of quantize_stochastic_pair over the dY the apply pass writes.
    stochastic_pair_run_fn *const round = stochastic_pair_run_tier();
    const int threads = std::max(1, num_threads);
    std::vector<float> buffers(static_cast<size_t>(threads * chunk_elems));
    const channel_planes s = src.shape;
    with_centered(src.src, [&](auto centered) {
        for_each_chunk(s.elements(), threads, [&](int64_t begin, int64_t end) {
            float *dy = buffers.data() + omp_get_thread_num() * chunk_elems;
            // the chunk's views start at `begin` (a multiple of 8: whole mask bytes)
            const float *g = src.diff_dst + begin;
            const uint8_t *bits = src.bits ? src.bits + begin / 8 : nullptr;
            for_each_plane_run(s, begin, end, [&](int64_t c, int64_t lo, int64_t hi) {
                K::gradient_apply(g, bits, centered.at(c).shifted(begin), lo - begin, hi - begin,
                                  src.a[c], src.b[c], src.k[c], dy, nullptr, nullptr);
                round(dy + (lo - begin), hi - lo, static_cast<uint64_t>(lo), multiplier[c], r,
                      q + lo, q_plain + lo);
            });
        });
    });
}

} // namespace qsp::detail::batch_norm_walk
