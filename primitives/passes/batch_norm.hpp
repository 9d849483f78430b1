// BatchNorm over the NCHW output of a sparse layer, with the ReLU after it:
// the passes of the fused Conv2d-BatchNorm2d(-ReLU) block. Torch runs that
// chain as two statistics passes, an apply pass and a ReLU pass forward (and
// saves the ReLU's fp32 output), a ReLU pass and two BatchNorm passes
// backward; these make one statistics pass and one apply pass that also
// writes the ReLU's 1-bit mask forward, and two passes backward that read
// the mask in place of a masked gradient. An int8 block keeps BatchNorm's
// input for the backward as one byte per element, written by the apply pass.
#pragma once

#include <cstdint>

#include "primitives/passes/quantize.hpp"

namespace qsp::detail {

// N x C x S (S = H * W) contiguous: plane (n, c) starts at (n * C + c) * S.
struct channel_planes {
    int64_t batch = 0, channels = 0, spatial = 0;
    int64_t elements() const { return batch * channels * spatial; }
};

// Per channel, over the batch and the plane: the mean and the biased
// variance. Each part — a plane, or a few small planes of ~512 elements in
// all — is summed in float in two passes while it is in cache (its mean,
// then the squares about it), parts are combined in double (Chan et al.'s
// pairwise update): no cancellation of E[x^2] - E[x]^2, one pass over
// memory. Threads take whole parts (runs of images, every channel) and read
// them in memory order; a channel's parts are combined in a fixed order:
// the results do not depend on the thread count. With `range` (C pairs, or
// null), also each channel's smallest and largest element, for the int8
// copy of src (meaningful where the mean is finite: a NaN may be skipped).
struct channel_range {
    float lowest, highest;
};
void channel_statistics(const float *src, channel_planes shape, double *mean, double *var,
                        channel_range *range, int num_threads);

// One part of a channel's values as channel_statistics sums it: its count,
// mean, the squares about that mean, and its range.
struct statistics_part {
    double count = 0, mean = 0, m2 = 0;
    channel_range range;
};
// Per channel c, its parts[(o * channels + c) * per_channel + j] (o <
// outer, j < per_channel; a part of count 0 adds nothing) combined in that
// order in double (Chan et al.), as channel_statistics combines its own:
// mean, biased variance, and (range: C pairs, or null) the range. The
// results do not depend on which threads found the parts.
void channel_statistics_from_parts(const statistics_part *parts, int64_t outer, int64_t channels,
                                   int64_t per_channel, double *mean, double *var,
                                   channel_range *range, int num_threads);

// The int8 copy of src a forward keeps for the backward:
// values[i] = round-half-even((src[i] - mean[c]) * inv[c]) in [-127, 127].
struct centered_s8_writer {
    int8_t *values;
    const float *mean, *inv;
};

// dst as the s8 forward of the layer reading it would quantize it
// (quantize_rne with a known max |dst|, the scale from it): values[i] =
// round-half-even(dst[i] * scale.inv), zeros where the scale is not usable.
struct quantized_s8_writer {
    int8_t *values;
    quant_scale scale;
};

// dst = src * scale[c] + shift[c], plus residual[i] when given (a residual
// block's add, after the normalisation as the unfused block rounds it); with
// `bits`, dst = max(0, that) and bits = !(that <= 0), as relu_mask_forward
// (bits in the flat element order); with `keep`, its values from src. dst
// may alias src or residual. With `quantized`, dst is not written (may be
// null): each piece of it is made in a thread's buffer while in L1 and
// rounded into quantized->values from there. With dst_abs_max (one float),
// also max |dst| (NaN where dst holds a NaN), taken while each piece is in
// cache: what the s8 layer reading dst would read it once more to find
// (after a residual's add; without one the ranges give it at no cost).
void scale_shift_relu(const float *src, channel_planes shape, const float *scale,
                      const float *shift, const float *residual, float *dst, uint8_t *bits,
                      const centered_s8_writer *keep, const quantized_s8_writer *quantized,
                      float *dst_abs_max, int num_threads);

// What the backward reads as src - mean[c]: the forward's src and mean
// (f32), or the int8 copy times its per-channel step.
struct centered_source {
    const float *src = nullptr, *mean = nullptr;
    const int8_t *values = nullptr;
    const float *step = nullptr;
};

// Per channel, with g = diff_dst masked by `bits` (when given): sum(g) and
// sum(g * (src - mean[c])), in double over float plane partials.
void masked_gradient_sums(const float *diff_dst, const uint8_t *bits, centered_source src,
                          channel_planes shape, double *sum_g, double *sum_g_centered,
                          int num_threads);

// diff_src = g * a[c] + (src - mean[c]) * b[c] + k[c], g as above, and,
// when given, diff_residual = g (the residual's gradient). diff_src (null:
// not wanted) may alias diff_dst; diff_residual may not alias either. With
// channel_abs_max (C floats), also max |diff_src| per channel (NaN where
// the channel holds a NaN), taken while each run is in L1 — what the next
// layer's s8 backward would read diff_src once more to find — also without
// diff_src (its values computed, not written: quantize_pair_from_gradient's
// maxima).
void masked_gradient_apply(const float *diff_dst, const uint8_t *bits, centered_source src,
                           channel_planes shape, const float *a, const float *b, const float *k,
                           float *diff_src, float *diff_residual, float *channel_abs_max,
                           int num_threads);

// dY of a BatchNorm (+ ReLU) backward as masked_gradient_apply writes it:
// dY = g * a[c] + (src - mean[c]) * b[c] + k[c], g = diff_dst masked by
// `bits` (when given). The description lets its reader compute dY where it
// needs it instead of reading it from memory.
struct batch_norm_gradient {
    const float *diff_dst = nullptr;
    const uint8_t *bits = nullptr;
    centered_source src;
    channel_planes shape;
    const float *a = nullptr, *b = nullptr, *k = nullptr;
};

// That dY written into diff_src (or null) and/or its channel maxima:
// masked_gradient_apply with the description's fields.
inline void masked_gradient_apply(const batch_norm_gradient &g, float *diff_src,
                                  float *channel_abs_max, int num_threads) {
    masked_gradient_apply(g.diff_dst, g.bits, g.src, g.shape, g.a, g.b, g.k, diff_src, nullptr,
                          channel_abs_max, num_threads);
}

// The s8 backward's pair of roundings (quantize.hpp) of that dY, channel c's
// values times multiplier[c] for q: the integers quantize_stochastic_pair
// writes from the materialised dY, without dY written or read (AVX-512:
// each vector of dY computed and rounded in registers; the other tiers make
// each chunk in a thread's buffer with the apply kernel and round it from
// there). The pair's scales come with `r` (from maxima found by
// masked_gradient_apply without diff_src).
void quantize_pair_from_gradient(const batch_norm_gradient &src, const float *multiplier,
                                 const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain,
                                 int num_threads);

// The tiers of each pass (the dispatchers above pick the best one the
// effective ISA allows); the results are the same bits on every tier.
using channel_statistics_fn = void(const float *src, channel_planes shape, double *mean,
                                   double *var, channel_range *range, int num_threads);
using scale_shift_relu_fn = void(const float *src, channel_planes shape, const float *scale,
                                 const float *shift, const float *residual, float *dst,
                                 uint8_t *bits, const centered_s8_writer *keep,
                                 const quantized_s8_writer *quantized, float *dst_abs_max,
                                 int num_threads);
using masked_gradient_sums_fn = void(const float *diff_dst, const uint8_t *bits,
                                     centered_source src, channel_planes shape, double *sum_g,
                                     double *sum_g_centered, int num_threads);
using masked_gradient_apply_fn = void(const float *diff_dst, const uint8_t *bits,
                                      centered_source src, channel_planes shape, const float *a,
                                      const float *b, const float *k, float *diff_src,
                                      float *diff_residual, float *channel_abs_max,
                                      int num_threads);
using quantize_pair_from_gradient_fn = void(const batch_norm_gradient &src, const float *multiplier,
                                            const stochastic_pair_rounding &r, int8_t *q,
                                            int8_t *q_plain, int num_threads);

namespace portable {
channel_statistics_fn channel_statistics;
scale_shift_relu_fn scale_shift_relu;
masked_gradient_sums_fn masked_gradient_sums;
masked_gradient_apply_fn masked_gradient_apply;
quantize_pair_from_gradient_fn quantize_pair_from_gradient;
} // namespace portable

channel_statistics_fn channel_statistics_avx2;
scale_shift_relu_fn scale_shift_relu_avx2;
scale_shift_relu_fn scale_shift_relu_avx512;
masked_gradient_sums_fn masked_gradient_sums_avx2;
masked_gradient_sums_fn masked_gradient_sums_avx512;
masked_gradient_apply_fn masked_gradient_apply_avx2;
quantize_pair_from_gradient_fn quantize_pair_from_gradient_avx2;
masked_gradient_apply_fn masked_gradient_apply_avx512;
quantize_pair_from_gradient_fn quantize_pair_from_gradient_avx512;

} // namespace qsp::detail
