// The two stochastic roundings of dY in an s8 backward (s8_protocol.hpp),
// for the implementations that read both as plain int8 the shape of dY. In
// a fused backward whose backward-weights kernel reads G1 that way, the
// backward-data direction makes G1 in the same pass as its own G2 (one pass
// reading dY twice instead of two reading it four times) and leaves it in the
// shared_gradient; the integers are those of the two separate calls.
#pragma once

#include "primitives/core/implementation.hpp"
#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/quantize.hpp"

namespace qsp::detail::s8 {

// Writes dY given as a BatchNorm's backward (g) into DIFF_DST, its
// scratch, once per fused backward.
inline void write_batch_norm_dy(const batch_norm_gradient &g, const tensors &t, int num_threads) {
    if (t.shared && t.shared->diff_dst_written) return;
    masked_gradient_apply(g, const_cast<float *>(t.diff_dst), nullptr, num_threads);
    if (t.shared) t.shared->diff_dst_written = true;
}

// The same for a kernel given the description (tensors::diff_dst_source),
// at the rare call that reads dY itself after all (a multiplier without
// exact pair maxima); a no-op for a dY in memory already.
inline void materialise_diff_dst(const tensors &t, int num_threads) {
    if (t.diff_dst_source) write_batch_norm_dy(*t.diff_dst_source, t, num_threads);
}

// G2 = sr(dY * w_scale / sg2) into g2 (n elements, multiplier layout as
// quantize_stochastic's); returns sg2. Makes G1 alongside when the fused
// backward's other direction wants it.
inline float quantize_dx_gradient(const tensors &t, int64_t n, const float *w_scale,
                                  int64_t channels, int64_t inner, int8_t *g2, int num_threads) {
    shared_gradient *shared = t.shared;
    if (!shared || shared->wanted != shared_gradient::form::s8_plain_dy_q) {
        materialise_diff_dst(t, num_threads);
        return quantize_stochastic(t.diff_dst, n, w_scale, channels, inner, dx_stream(t.seed), g2,
                                   num_threads);
    }
    auto *g1 = shared->scratch.get<int8_t>(0, n);
    // the maxima from the channel maxima diff_dst's writer found, when given
    stochastic_maxima known{};
    const bool given =
            t.diff_dst_channel_abs_max
            && pair_maxima_from_channels(t.diff_dst_channel_abs_max, w_scale, channels, known);
    if (t.diff_dst_source && given) { // dY as the BatchNorm computes it, never in memory
        const stochastic_pair_rounding r{quant_scale_from_abs_max(known.scaled),
                                         quant_scale_from_abs_max(known.plain), dx_stream(t.seed),
                                         dw_stream(t.seed)};
        quantize_pair_from_gradient(*t.diff_dst_source, w_scale, r, g2, g1, num_threads);
        shared->kind = shared_gradient::form::s8_plain_dy_q;
        shared->data = g1;
        shared->scale = r.plain.scale;
        return r.scaled.scale;
    }
    materialise_diff_dst(t, num_threads);
    const stochastic_scales s =
            quantize_stochastic_pair(t.diff_dst, n, w_scale, channels, inner, dx_stream(t.seed), g2,
                                     dw_stream(t.seed), g1, given ? &known : nullptr, num_threads);
    shared->kind = shared_gradient::form::s8_plain_dy_q;
    shared->data = g1;
    shared->scale = s.plain;
    return s.scaled;
}

struct dw_gradient {
    const int8_t *g1;
    float scale; // sg1
};

// max |dY| from the `out_channels` channel maxima dY's writer handed over
// (tensors::diff_dst_channel_abs_max), into *out; false without them.
inline bool plain_maximum_given(const tensors &t, int64_t out_channels, float *out) {
    stochastic_maxima known{};
    if (!t.diff_dst_channel_abs_max
        || !pair_maxima_from_channels(t.diff_dst_channel_abs_max, nullptr, out_channels, known))
        return false;
    *out = known.plain;
    return true;
}

// G1 = sr(dY / sg1), n elements: the one backward-data left in the fused
// backward, else quantized here into `scratch` (in one read of dY where its
// writer handed over its `out_channels` channel maxima).
inline dw_gradient quantize_dw_gradient(const tensors &t, int64_t n, int64_t out_channels,
                                        int8_t *scratch, int num_threads) {
    if (t.shared && t.shared->kind == shared_gradient::form::s8_plain_dy_q)
        return {static_cast<const int8_t *>(t.shared->data), t.shared->scale};
    float peak = 0.f;
    if (plain_maximum_given(t, out_channels, &peak))
        return {scratch, quantize_stochastic_plain_from_max(t.diff_dst, n, dw_stream(t.seed), peak,
                                                            scratch, num_threads)};
    return {scratch, quantize_stochastic(t.diff_dst, n, nullptr, 1, 1, dw_stream(t.seed), scratch,
                                         num_threads)};
}

// G1 of dY [batch x channels] as the s8 SDDMM's u8 tiles (G1 + 128); returns
// sg1. From the fused backward's plain G1 when backward-data left it (bytes
// moved: dY is not read, nor its maximum found, a second time), else
// quantized from dY here — in one read of it where dY's writer handed over
// its `out_channels` channel maxima (a network's first layer, whose
// backward is backward-weights alone); the same integers either way.
inline float dw_gradient_tiles(const tensors &t, int64_t batch, int64_t channels,
                               int64_t out_channels, uint8_t *tiles, int num_threads) {
    if (t.shared && t.shared->kind == shared_gradient::form::s8_plain_dy_q) {
        shift_to_s8_tiles(static_cast<const int8_t *>(t.shared->data), batch, channels, tiles,
                          num_threads);
        return t.shared->scale;
    }
    float peak = 0.f;
    const bool given = plain_maximum_given(t, out_channels, &peak);
    return quantize_stochastic_to_s8_tiles(t.diff_dst, batch, channels, dw_stream(t.seed), tiles,
                                           given ? &peak : nullptr, num_threads);
}

} // namespace qsp::detail::s8
