// Dispatch of the s8 passes over the tiers the effective ISA allows.
#include "primitives/passes/quantize.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "primitives/passes/pass_tiers.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

float quantize_rne(const float *x, int64_t n, int8_t *q, const float *known, int num_threads) {
    static constexpr pass_tier<quantize_rne_fn> tiers[] = {
            {cpu_isa::avx512_core, quantize_rne_avx512},
            {cpu_isa::avx2, quantize_rne_avx2},
            {cpu_isa::ref, portable::quantize_rne}};
    return best_tier(tiers)(x, n, q, known, num_threads);
}

namespace {

// The vector tiers of the stochastic passes see the tensor as whole rows: of
// `channels` columns (inner == 1) or of `inner` elements sharing one
// multiplier.
bool whole_multiplier_rows(int64_t n, const float *multiplier, int64_t channels, int64_t inner) {
    return !multiplier || n % (inner == 1 ? channels : inner) == 0;
}

} // namespace

float quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
                          int64_t inner, uint32_t seed32, int8_t *q, int num_threads) {
    const bool whole_rows = whole_multiplier_rows(n, multiplier, channels, inner);
    static constexpr pass_tier<quantize_stochastic_fn> tiers[] = {
            {cpu_isa::avx512_core, quantize_stochastic_avx512},
            {cpu_isa::avx2, quantize_stochastic_avx2},
            {cpu_isa::ref, portable::quantize_stochastic}};
    return best_tier(tiers, whole_rows)(x, n, multiplier, channels, inner, seed32, q, num_threads);
}

stochastic_scales quantize_stochastic_pair(const float *x, int64_t n, const float *multiplier,
                                           int64_t channels, int64_t inner, uint32_t seed32,
                                           int8_t *q, uint32_t plain_seed32, int8_t *q_plain,
                                           const stochastic_maxima *known, int num_threads) {
    const bool whole_rows = whole_multiplier_rows(n, multiplier, channels, inner);
    static constexpr pass_tier<quantize_stochastic_pair_fn> tiers[] = {
            {cpu_isa::avx512_core, quantize_stochastic_pair_avx512},
            {cpu_isa::avx2, quantize_stochastic_pair_avx2},
            {cpu_isa::ref, portable::quantize_stochastic_pair}};
    return best_tier(tiers, whole_rows)(x, n, multiplier, channels, inner, seed32, q, plain_seed32,
                                        q_plain, known, num_threads);
}

stochastic_scales portable::quantize_stochastic_pair(const float *x, int64_t n,
                                                     const float *multiplier, int64_t channels,
                                                     int64_t inner, uint32_t seed32, int8_t *q,
                                                     uint32_t plain_seed32, int8_t *q_plain,
                                                     const stochastic_maxima *known,
                                                     int num_threads) {
    if (!known)
        return {quantize_stochastic(x, n, multiplier, channels, inner, seed32, q, num_threads),
                quantize_stochastic(x, n, nullptr, 1, 1, plain_seed32, q_plain, num_threads)};
    return {quantize_stochastic_from_max(x, n, multiplier, channels, inner, seed32, known->scaled,
                                         q, num_threads),
            quantize_stochastic_from_max(x, n, nullptr, 1, 1, plain_seed32, known->plain, q_plain,
                                         num_threads)};
}

bool pair_maxima_from_channels(const float *channel_abs_max, const float *multiplier,
                               int64_t channels, stochastic_maxima &out) {
    float scaled = 0.0f, plain = 0.0f;
    bool nan_scaled = false, nan_plain = false;
    for (int64_t c = 0; c < channels; ++c) {
        const float m = multiplier ? multiplier[c] : 1.0f;
        if (std::isinf(m)) return false;
        const float v = std::fabs(channel_abs_max[c] * m);
        nan_plain |= std::isnan(channel_abs_max[c]);
        nan_scaled |= std::isnan(v);
        plain = std::max(plain, std::fabs(channel_abs_max[c]));
        scaled = std::max(scaled, v);
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    out = {nan_scaled ? nan : scaled, nan_plain ? nan : plain};
    return true;
}

void quantize_weights(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                      int num_threads) {
    // the vector tiers read the rows only: a form of their own
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        quantize_weights_avx512(p.row_ptr(), p.rows(), values, q, scale, num_threads);
    else if (effective_cpu_isa() >= cpu_isa::avx2)
        quantize_weights_avx2(p.row_ptr(), p.rows(), values, q, scale, num_threads);
    else
        portable::quantize_weights(p, values, q, scale, num_threads);
}

float quantize_stochastic_plain_from_max(const float *x, int64_t n, uint32_t seed32, float abs_max,
                                         int8_t *q, int num_threads) {
    static constexpr pass_tier<quantize_stochastic_plain_from_max_fn> tiers[] = {
            {cpu_isa::avx512_core, quantize_stochastic_plain_from_max_avx512},
            {cpu_isa::avx2, quantize_stochastic_plain_from_max_avx2},
            {cpu_isa::ref, portable::quantize_stochastic_plain_from_max}};
    return best_tier(tiers)(x, n, seed32, abs_max, q, num_threads);
}

float quantize_stochastic_to_s8_tiles(const float *x, int64_t batch, int64_t channels,
                                      uint32_t seed32, uint8_t *tiles, const float *known_abs_max,
                                      int num_threads) {
    static constexpr pass_tier<quantize_stochastic_to_s8_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, quantize_stochastic_to_s8_tiles_avx512},
            {cpu_isa::avx2, quantize_stochastic_to_s8_tiles_avx2},
            {cpu_isa::ref, portable::quantize_stochastic_to_s8_tiles}};
    return best_tier(tiers)(x, batch, channels, seed32, tiles, known_abs_max, num_threads);
}

void pack_s8_tiles(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                   int32_t *column_sums, int num_threads) {
    static constexpr pass_tier<pack_s8_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_s8_tiles_avx512},
            {cpu_isa::avx2, pack_s8_tiles_avx2},
            {cpu_isa::ref, portable::pack_s8_tiles}};
    best_tier(tiers)(x, batch, channels, tiles, column_sums, num_threads);
}

void shift_to_s8_tiles(const int8_t *q, int64_t batch, int64_t channels, uint8_t *tiles,
                       int num_threads) {
    static constexpr pass_tier<shift_to_s8_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, shift_to_s8_tiles_avx512},
            {cpu_isa::avx2, shift_to_s8_tiles_avx2},
            {cpu_isa::ref, portable::shift_to_s8_tiles}};
    best_tier(tiers)(q, batch, channels, tiles, num_threads);
}

void pack_quad_tiles(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                     int num_threads) {
    static constexpr pass_tier<pack_quad_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_quad_tiles_avx512},
            {cpu_isa::avx2, pack_quad_tiles_avx2},
            {cpu_isa::ref, portable::pack_quad_tiles}};
    best_tier(tiers)(x, batch, channels, tiles, num_threads);
}

void unpack_s32_tiles(const int32_t *tiles, int64_t batch, int64_t channels,
                      const int32_t *correction, const float *scale, const float *bias, float *dst,
                      int num_threads, int64_t inner) {
    static constexpr pass_tier<unpack_s32_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, unpack_s32_tiles_avx512},
            {cpu_isa::avx2, unpack_s32_tiles_avx2},
            {cpu_isa::ref, portable::unpack_s32_tiles}};
    best_tier(tiers)(tiles, batch, channels, correction, scale, bias, dst, num_threads, inner);
}

void column_sums_s8(const int8_t *x, int64_t batch, int64_t channels, int32_t *sums,
                    int num_threads) {
    static constexpr pass_tier<column_sums_s8_fn> tiers[] = {
            {cpu_isa::avx512_core, column_sums_s8_avx512},
            {cpu_isa::avx2, column_sums_s8_avx2},
            {cpu_isa::ref, portable::column_sums_s8}};
    best_tier(tiers)(x, batch, channels, sums, num_threads);
}

expand_quad_words_fn *expand_quad_words_tier() {
    static constexpr pass_tier<expand_quad_words_fn> tiers[] = {
            {cpu_isa::avx512_core, expand_quad_words_avx512}, {cpu_isa::ref, nullptr}};
    return best_tier(tiers);
}

entry_pair_words_fn *entry_pair_words_tier() {
    static constexpr pass_tier<entry_pair_words_fn> tiers[] = {
            {cpu_isa::avx2, entry_pair_words_avx2}, {cpu_isa::ref, nullptr}};
    return best_tier(tiers);
}

const kept_s8_passes *kept_s8_passes_tier() {
    static constexpr pass_tier<const kept_s8_passes> tiers[] = {
            {cpu_isa::avx2, &kept_s8_passes_avx2}, {cpu_isa::ref, nullptr}};
    return best_tier(tiers);
}

stochastic_pair_run_fn *stochastic_pair_run_tier() {
    static constexpr pass_tier<stochastic_pair_run_fn> tiers[] = {
            {cpu_isa::avx2, stochastic_pair_run_avx2},
            {cpu_isa::ref, portable::stochastic_pair_run}};
    return best_tier(tiers);
}

} // namespace qsp::detail
