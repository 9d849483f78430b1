// The portable tier of the s8 passes: the plain statement of each rule
// (include/qsparseprop/quantization.hpp), the fallback on any CPU, and what
// the vector tiers are tested against.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "jit/tile_abi.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "qsparseprop/quantization.hpp"

namespace qsp::detail {

namespace portable {

namespace {

constexpr int64_t tb = jit::tile_batch;

// int8 [batch x channels] -> tiles of (x + offset) as out_t, padding = offset.
template <typename out_t>
void pack_bytes_to_tiles(const int8_t *x, int64_t batch, int64_t channels, out_t *tiles, int offset,
                         int num_threads) {
    const int64_t tiles_n = jit::tile_count(batch);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t c = 0; c < channels; ++c)
            for (int64_t j = 0; j < tb; ++j) {
                const int64_t b = t * tb + j;
                tiles[(t * channels + c) * tb + j] =
                        static_cast<out_t>((b < batch ? x[b * channels + c] : 0) + offset);
            }
}

inline int8_t clamp_q(float v) {
    return static_cast<int8_t>(
            std::min(std::max(v, -static_cast<float>(quant_max)), static_cast<float>(quant_max)));
}

} // namespace

float abs_max(const float *x, int64_t n) {
    float m = 0.f;
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {
        float a = std::fabs(x[i]);
        nan |= std::isnan(a);
        m = std::max(m, a);
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

float quantize_rne(const float *x, int64_t n, int8_t *q, const float *known, int num_threads) {
    const auto [scale, inv, usable] = quant_scale_from_abs_max(known ? *known : abs_max(x, n));
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i)
        q[i] = usable ? clamp_q(std::nearbyint(x[i] * inv)) : 0;
    return scale;
}

void quantize_weights(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                      int num_threads) {
    const int64_t *rp = p.row_ptr();
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < p.rows(); ++r) {
        const auto [s, inv, usable] =
                quant_scale_from_abs_max(abs_max(values + rp[r], rp[r + 1] - rp[r]));
        for (int64_t i = rp[r]; i < rp[r + 1]; ++i)
            q[i] = usable ? clamp_q(std::nearbyint(values[i] * inv)) : 0;
        scale[r] = s;
    }
}

float quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
                          int64_t inner, uint32_t seed32, int8_t *q, int num_threads) {
    float amax = 0.f;
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {
        float a = std::fabs(multiplier ? x[i] * multiplier[(i / inner) % channels] : x[i]);
        nan |= std::isnan(a);
        amax = std::max(amax, a);
    }
    return quantize_stochastic_from_max(x, n, multiplier, channels, inner, seed32,
                                        nan ? std::numeric_limits<float>::quiet_NaN() : amax, q,
                                        num_threads);
}

float quantize_stochastic_from_max(const float *x, int64_t n, const float *multiplier,
                                   int64_t channels, int64_t inner, uint32_t seed32, float abs_max,
                                   int8_t *q, int num_threads) {
    auto value = [&](int64_t i) {
        return multiplier ? x[i] * multiplier[(i / inner) % channels] : x[i];
    };
    const auto [scale, inv, usable] = quant_scale_from_abs_max(abs_max);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i)
        q[i] = usable ? stochastic_round(
                       value(i) * inv, stochastic_rounding_noise(seed32, static_cast<uint64_t>(i)))
                      : 0;
    return scale;
}

void stochastic_pair_run(const float *x, int64_t n, uint64_t first, float mult,
                         const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain) {
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t index = first + static_cast<uint64_t>(i);
        q[i] = r.scaled.usable ? stochastic_round(x[i] * mult * r.scaled.inv,
                                                  stochastic_rounding_noise(r.seed32, index))
                               : 0;
        q_plain[i] = r.plain.usable ? stochastic_round(
                             x[i] * r.plain.inv, stochastic_rounding_noise(r.plain_seed32, index))
                                    : 0;
    }
}

float quantize_stochastic_plain_from_max(const float *x, int64_t n, uint32_t seed32, float abs_max,
                                         int8_t *q, int num_threads) {
    return quantize_stochastic_from_max(x, n, nullptr, 1, 1, seed32, abs_max, q, num_threads);
}

float quantize_stochastic_to_s8_tiles(const float *x, int64_t batch, int64_t channels,
                                      uint32_t seed32, uint8_t *tiles, const float *known_abs_max,
                                      int num_threads) {
    std::vector<int8_t> q(static_cast<size_t>(batch * channels));
    const float scale =
            known_abs_max ? quantize_stochastic_from_max(x, batch * channels, nullptr, 1, 1, seed32,
                                                         *known_abs_max, q.data(), num_threads)
                          : quantize_stochastic(x, batch * channels, nullptr, 1, 1, seed32,
                                                q.data(), num_threads);
    shift_to_s8_tiles(q.data(), batch, channels, tiles, num_threads);
    return scale;
}

void shift_to_s8_tiles(const int8_t *q, int64_t batch, int64_t channels, uint8_t *tiles,
                       int num_threads) {
    pack_bytes_to_tiles(q, batch, channels, tiles, 128, num_threads);
}

void pack_s8_tiles(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                   int32_t *column_sums, int num_threads) {
    pack_bytes_to_tiles(x, batch, channels, tiles, 0, num_threads);
    if (column_sums) column_sums_s8(x, batch, channels, column_sums, num_threads);
}

void pack_quad_tiles(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                     int num_threads) {
    const int64_t tiles_n = jit::tile_count(batch), quads = (channels + 3) / 4;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t q = 0; q < quads; ++q)
            for (int64_t j = 0; j < tb; ++j)
                for (int64_t k = 0; k < 4; ++k) {
                    const int64_t b = t * tb + j, c = 4 * q + k;
                    const int8_t v = b < batch && c < channels ? x[b * channels + c] : 0;
                    tiles[((t * quads + q) * tb + j) * 4 + k] =
                            static_cast<uint8_t>(v ^ 0x80); // x + 128
                }
}

void unpack_s32_tiles(const int32_t *tiles, int64_t batch, int64_t channels,
                      const int32_t *correction, const float *scale, const float *bias, float *dst,
                      int num_threads, int64_t inner) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < channels; ++c) {
            const int64_t k = c / inner;
            const int32_t acc = tiles[((b / tb) * channels + c) * tb + b % tb];
            const float y = static_cast<float>(acc - correction[k]) * scale[k];
            dst[b * channels + c] = bias ? y + bias[k] : y;
        }
}

void column_sums_s8(const int8_t *x, int64_t batch, int64_t channels, int32_t *sums,
                    int num_threads) {
    constexpr int64_t chunk = 256;
    const int64_t chunks = (channels + chunk - 1) / chunk;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
        const int64_t c0 = ch * chunk, c1 = std::min(channels, c0 + chunk);
        for (int64_t c = c0; c < c1; ++c)
            sums[c] = 0;
        for (int64_t b = 0; b < batch; ++b)
            for (int64_t c = c0; c < c1; ++c)
                sums[c] += x[b * channels + c];
    }
}

} // namespace portable

} // namespace qsp::detail
