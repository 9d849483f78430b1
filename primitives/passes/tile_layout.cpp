// Dispatch over the tiers, and the portable tier of the f32 layout passes.
#include "primitives/passes/tile_layout.hpp"

#include <algorithm>
#include <cstring>

#include "primitives/passes/pass_tiers.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

namespace {
constexpr int64_t tb = jit::tile_batch;
constexpr int64_t channel_block = 16;
} // namespace

void portable::pack_tiles(const float *src, int64_t batch, int64_t channels, float *tiles,
                          int num_threads) {
    const int64_t tiles_n = tile_count(batch);
    const int64_t blocks = (channels + channel_block - 1) / channel_block;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < blocks; ++cb) {
            const int64_t c0 = cb * channel_block, c1 = std::min(channels, c0 + channel_block);
            const int64_t rows = std::min(tb, batch - t * tb);
            float *tile = tiles + t * channels * tb;
            float block[channel_block][tb]; // transposed in cache, then streamed out
            for (int64_t j = 0; j < tb; ++j) {
                const float *row = src + (t * tb + j) * channels;
                for (int64_t c = c0; c < c1; ++c)
                    block[c - c0][j] = j < rows ? row[c] : 0.f;
            }
            for (int64_t c = c0; c < c1; ++c)
                std::memcpy(tile + c * tb, block[c - c0], sizeof(float) * tb);
        }
}

void portable::unpack_tiles(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                            float *dst, int num_threads, int64_t bias_inner) {
    const int64_t blocks = (channels + channel_block - 1) / channel_block;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t cb = 0; cb < blocks; ++cb) {
            const int64_t t = b / tb, j = b % tb;
            const float *tile = tiles + t * channels * tb;
            const int64_t c0 = cb * channel_block, c1 = std::min(channels, c0 + channel_block);
            for (int64_t c = c0; c < c1; ++c)
                dst[b * channels + c] = tile[c * tb + j] + (bias ? bias[c / bias_inner] : 0.f);
        }
}

void finish_kept_tiles(float *tiles, int64_t batch, int64_t channels, const float *bias,
                       int num_threads) {
    const int64_t tiles_n = tile_count(batch), tail = batch - (tiles_n - 1) * tb;
    if (!bias && tail == tb) return; // nothing to add, no padding
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t c = 0; c < channels; ++c) {
            float *row = tiles + (t * channels + c) * tb;
            const int64_t lanes = t + 1 < tiles_n ? tb : tail;
            if (bias) {
                const float b = bias[c];
#pragma omp simd
                for (int64_t j = 0; j < lanes; ++j)
                    row[j] += b;
            }
            std::fill(row + lanes, row + tb, 0.f);
        }
}

void pack_kept(const float *src, int64_t batch, int64_t channels, float *tiles, int num_threads) {
    pack_tiles(src, batch, channels, tiles, num_threads);
    finish_kept_tiles(tiles, batch, channels, nullptr, num_threads);
}

void pack_tiles(const float *src, int64_t batch, int64_t channels, float *tiles, int num_threads) {
    static constexpr pass_tier<pack_tiles_fn> tiers[] = {{cpu_isa::avx512_core, pack_tiles_avx512},
                                                         {cpu_isa::avx2, pack_tiles_avx2},
                                                         {cpu_isa::ref, portable::pack_tiles}};
    best_tier(tiers)(src, batch, channels, tiles, num_threads);
}

void unpack_tiles(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                  float *dst, int num_threads, int64_t bias_inner) {
    static constexpr pass_tier<unpack_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, unpack_tiles_avx512},
            {cpu_isa::avx2, unpack_tiles_avx2},
            {cpu_isa::ref, portable::unpack_tiles}};
    best_tier(tiers)(tiles, batch, channels, bias, dst, num_threads, bias_inner);
}

} // namespace qsp::detail
