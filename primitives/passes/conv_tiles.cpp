// Dispatch over the tiers, and the portable tier of the Conv2d layout passes.
#include "primitives/passes/conv_tiles.hpp"

#include <algorithm>
#include <cstring>

#include "primitives/passes/pass_tiers.hpp"
#include "primitives/passes/quantize.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

namespace {

constexpr int64_t tb = jit::tile_batch;

struct padded_plane {
    int64_t h, w, hp, wp;
    const spatial_pad &pad;
    padded_plane(int64_t h_, int64_t w_, const spatial_pad &p)
        : h(h_), w(w_), hp(h_ + p.top + p.bottom), wp(w_ + p.left + p.right), pad(p) {}
    // The source pixel of padded pixel (y, x), or -1 in the padding.
    int64_t source(int64_t y, int64_t x) const {
        const int64_t iy = y - pad.top, ix = x - pad.left;
        return iy >= 0 && iy < h && ix >= 0 && ix < w ? iy * w + ix : -1;
    }
};

} // namespace

namespace portable {

void pack_conv_tiles(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                     const spatial_pad &pad, float *tiles, int num_threads) {
    const padded_plane pl(h, w, pad);
    const int64_t rows = pl.hp * pl.wp * channels, plane = h * w;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < jit::tile_count(batch); ++t)
        for (int64_t px = 0; px < pl.hp * pl.wp; ++px) {
            const int64_t s = pl.source(px / pl.wp, px % pl.wp);
            for (int64_t c = 0; c < channels; ++c) {
                float *row = tiles + (t * rows + px * channels + c) * tb;
                for (int64_t j = 0; j < tile_lanes(batch, t); ++j) {
                    const int64_t b = t * tb + j;
                    row[j] = s >= 0 && b < batch ? src[(b * channels + c) * plane + s] : 0.f;
                }
            }
        }
}

void unpack_conv_tiles(const float *tiles, int64_t batch, int64_t channels, int64_t pixels,
                       const float *bias, float *dst, int num_threads) {
    const int64_t rows = pixels * channels;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < channels; ++c)
            for (int64_t p = 0; p < pixels; ++p)
                dst[(b * channels + c) * pixels + p] =
                        tiles[((b / tb) * rows + p * channels + c) * tb + b % tb]
                        + (bias ? bias[c] : 0.f);
}

namespace {

// Quad (per_word 4: the bytes x + 128) or pair (2: the u16 x + 128) tiles:
// one 4-byte word per batch lane of each row.
template <int per_word>
void pack_conv_word_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, uint8_t *tiles, int num_threads) {
    constexpr int slot_bytes = 4 / per_word;
    const padded_plane pl(h, w, pad);
    const int64_t words = (channels + per_word - 1) / per_word, rows = pl.hp * pl.wp * words,
                  plane = h * w;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < jit::tile_count(batch); ++t)
        for (int64_t px = 0; px < pl.hp * pl.wp; ++px) {
            const int64_t s = pl.source(px / pl.wp, px % pl.wp);
            for (int64_t q = 0; q < words; ++q) {
                uint8_t *row = tiles + (t * rows + px * words + q) * jit::tile_row_bytes;
                for (int64_t j = 0; j < tile_lanes(batch, t); ++j)
                    for (int64_t k = 0; k < per_word; ++k) {
                        const int64_t b = t * tb + j, c = per_word * q + k;
                        const int8_t v = s >= 0 && b < batch && c < channels
                                                 ? x[(b * channels + c) * plane + s]
                                                 : 0;
                        uint8_t *slot = row + j * 4 + k * slot_bytes;
                        slot[0] = static_cast<uint8_t>(v ^ 0x80); // x + 128
                        for (int z = 1; z < slot_bytes; ++z)
                            slot[z] = 0;
                    }
            }
        }
}

} // namespace

void pack_conv_quad_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, uint8_t *tiles, int num_threads) {
    pack_conv_word_tiles<4>(x, batch, channels, h, w, pad, tiles, num_threads);
}

void pack_conv_pair_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, uint8_t *tiles, int num_threads) {
    pack_conv_word_tiles<2>(x, batch, channels, h, w, pad, tiles, num_threads);
}

void pack_conv_s8_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                        const spatial_pad &pad, int8_t *tiles, int32_t *plane_sums,
                        int num_threads) {
    if (plane_sums) column_sums_s8(x, batch, channels * h * w, plane_sums, num_threads);
    const padded_plane pl(h, w, pad);
    const int64_t rows = pl.hp * pl.wp * channels, plane = h * w;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < jit::tile_count(batch); ++t)
        for (int64_t px = 0; px < pl.hp * pl.wp; ++px) {
            const int64_t s = pl.source(px / pl.wp, px % pl.wp);
            for (int64_t c = 0; c < channels; ++c) {
                int8_t *row = tiles + (t * rows + px * channels + c) * jit::s8_tile_row_bytes;
                for (int64_t j = 0; j < tb; ++j) {
                    const int64_t b = t * tb + j;
                    row[j] = s >= 0 && b < batch ? x[(b * channels + c) * plane + s] : 0;
                }
            }
        }
}

void unpack_conv_s32_tiles(const int32_t *tiles, int64_t batch, int64_t channels, int64_t pixels,
                           const int32_t *correction, int64_t correction_inner, const float *scale,
                           int64_t scale_inner, const float *bias, float *dst, int num_threads) {
    const int64_t rows = pixels * channels;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t c = 0; c < channels; ++c)
            for (int64_t p = 0; p < pixels; ++p) {
                const int64_t cp = c * pixels + p;
                const int32_t acc = tiles[((b / tb) * rows + p * channels + c) * tb + b % tb];
                const float y = static_cast<float>(acc - correction[cp / correction_inner])
                                * scale[cp / scale_inner];
                dst[(b * channels + c) * pixels + p] = bias ? y + bias[c] : y;
            }
}

} // namespace portable

void pack_conv_tiles(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                     const spatial_pad &pad, float *tiles, int num_threads) {
    static constexpr pass_tier<pack_conv_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_conv_tiles_avx512},
            {cpu_isa::avx2, pack_conv_tiles_avx2},
            {cpu_isa::ref, portable::pack_conv_tiles}};
    best_tier(tiers)(src, batch, channels, h, w, pad, tiles, num_threads);
}

void unpack_conv_tiles(const float *tiles, int64_t batch, int64_t channels, int64_t pixels,
                       const float *bias, float *dst, int num_threads) {
    static constexpr pass_tier<unpack_conv_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, unpack_conv_tiles_avx512},
            {cpu_isa::avx2, unpack_conv_tiles_avx2},
            {cpu_isa::ref, portable::unpack_conv_tiles}};
    best_tier(tiers)(tiles, batch, channels, pixels, bias, dst, num_threads);
}

void pack_conv_quad_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, uint8_t *tiles, int num_threads) {
    static constexpr pass_tier<pack_conv_quad_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_conv_quad_tiles_avx512},
            {cpu_isa::ref, portable::pack_conv_quad_tiles}};
    best_tier(tiers)(x, batch, channels, h, w, pad, tiles, num_threads);
}

void pack_conv_pair_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, uint8_t *tiles, int num_threads) {
    static constexpr pass_tier<pack_conv_pair_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_conv_pair_tiles_avx512},
            {cpu_isa::ref, portable::pack_conv_pair_tiles}};
    best_tier(tiers)(x, batch, channels, h, w, pad, tiles, num_threads);
}

void pack_conv_s8_tiles(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                        const spatial_pad &pad, int8_t *tiles, int32_t *plane_sums,
                        int num_threads) {
    static constexpr pass_tier<pack_conv_s8_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_conv_s8_tiles_avx512},
            {cpu_isa::avx2, pack_conv_s8_tiles_avx2},
            {cpu_isa::ref, portable::pack_conv_s8_tiles}};
    best_tier(tiers)(x, batch, channels, h, w, pad, tiles, plane_sums, num_threads);
}

void unpack_conv_s32_tiles(const int32_t *tiles, int64_t batch, int64_t channels, int64_t pixels,
                           const int32_t *correction, int64_t correction_inner, const float *scale,
                           int64_t scale_inner, const float *bias, float *dst, int num_threads) {
    static constexpr pass_tier<unpack_conv_s32_tiles_fn> tiers[] = {
            {cpu_isa::avx512_core, unpack_conv_s32_tiles_avx512},
            {cpu_isa::ref, portable::unpack_conv_s32_tiles}};
    best_tier(tiers)(tiles, batch, channels, pixels, correction, correction_inner, scale,
                     scale_inner, bias, dst, num_threads);
}

} // namespace qsp::detail
