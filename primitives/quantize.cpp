#include "primitives/quantize.hpp"

#include <vector>

#include "primitives/tile_layout.hpp"

#include "primitives/ref/ref_kernels.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

float fast_quantize_rne(const float *x, int64_t n, int8_t *q, int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return quantize_rne_avx512(x, n, q, num_threads);
    if (effective_cpu_isa() >= cpu_isa::avx2) return quantize_rne_avx2(x, n, q, num_threads);
    return ref::quantize_rne(x, n, q, num_threads);
}

float fast_quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
                               uint32_t seed32, int8_t *q, int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return quantize_stochastic_avx512(x, n, multiplier, channels, seed32, q, num_threads);
    if (effective_cpu_isa() >= cpu_isa::avx2)
        return quantize_stochastic_avx2(x, n, multiplier, channels, seed32, q, num_threads);
    return ref::quantize_stochastic(x, n, multiplier, channels, 1, seed32, q, num_threads);
}

void fast_quantize_weights(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                           int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        quantize_weights_avx512(p.row_ptr(), p.rows(), values, q, scale, num_threads);
    else
        ref::quantize_weights(p, values, q, scale, num_threads);
}

namespace {
constexpr int64_t tb = jit::tile_batch;
} // namespace

float quantize_stochastic_to_s8_tiles(const float *x, int64_t batch, int64_t channels,
                                      uint32_t seed32, uint8_t *tiles, int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return quantize_stochastic_to_s8_tiles_avx512(x, batch, channels, seed32, tiles,
                                                      num_threads);
    std::vector<int8_t> q(static_cast<size_t>(batch * channels));
    const float scale = fast_quantize_stochastic(x, batch * channels, nullptr, 1, seed32, q.data(),
                                                 num_threads);
    const int64_t tiles_n = tile_count(batch);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t c = 0; c < channels; ++c)
            for (int64_t j = 0; j < tb; ++j) {
                const int64_t b = t * tb + j;
                tiles[(t * channels + c) * tb + j] =
                        static_cast<uint8_t>((b < batch ? q[b * channels + c] : 0) + 128);
            }
    return scale;
}

void pack_s8_tiles(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                   int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return pack_s8_tiles_avx512(x, batch, channels, tiles, num_threads);
    const int64_t tiles_n = tile_count(batch);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t c = 0; c < channels; ++c)
            for (int64_t j = 0; j < tb; ++j) {
                const int64_t b = t * tb + j;
                tiles[(t * channels + c) * tb + j] = b < batch ? x[b * channels + c] : 0;
            }
}

void pack_quad_tiles(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                     int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return pack_quad_tiles_avx512(x, batch, channels, tiles, num_threads);
    const int64_t tiles_n = tile_count(batch), quads = (channels + 3) / 4;
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
                      int num_threads) {
    if (effective_cpu_isa() >= cpu_isa::avx512_core)
        return unpack_s32_tiles_avx512(tiles, batch, channels, correction, scale, bias, dst,
                                       num_threads);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < channels; ++c) {
            const int32_t acc = tiles[((b / tb) * channels + c) * tb + b % tb];
            const float y = static_cast<float>(acc - correction[c]) * scale[c];
            dst[b * channels + c] = bias ? y + bias[c] : y;
        }
}

} // namespace qsp::detail
