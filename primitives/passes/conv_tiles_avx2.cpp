// The AVX2 tier of the Conv2d tile packs (called only after CPU detection):
// blocks of batch elements x consecutive pixels of one channel plane
// (across image rows, so narrow images fill them too) transposed in
// registers; the portable loops read each value from another image
// (channels * h * w values apart), a cache line per value.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "primitives/passes/conv_tiles.hpp"
#include "primitives/passes/simd_avx2.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail {

void pack_conv_tiles_avx2(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, float *tiles, int num_threads) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t hp = h + pad.top + pad.bottom, wp = w + pad.left + pad.right;
    const int64_t rows = hp * wp * channels, plane = h * w, tiles_n = jit::tile_count(batch),
                  pblocks = (plane + 7) / 8;
    const int64_t pixel_floats = channels * tb; // one padded pixel's rows
#pragma omp parallel num_threads(num_threads)
    {
        // 8 batch elements x 8 consecutive pixels of a channel plane (across
        // image rows), transposed in registers
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t pb = 0; pb < pblocks; ++pb) {
                const int64_t p0 = pb * 8, pn = std::min<int64_t>(8, plane - p0);
                const int64_t lanes = tile_lanes(batch, t);
                float *pixel_rows[8];
                for (int64_t k = 0; k < pn; ++k) {
                    const int64_t y = (p0 + k) / w, xx = (p0 + k) % w;
                    pixel_rows[k] = tiles + t * rows * tb
                                    + ((y + pad.top) * wp + xx + pad.left) * pixel_floats;
                }
                for (int64_t c = 0; c < channels; ++c)
                    for (int64_t j0 = 0; j0 < lanes; j0 += 8) {
                        __m256 r[8];
                        for (int i = 0; i < 8; ++i) {
                            const int64_t b = t * tb + j0 + i;
                            r[i] = b < batch ? avx2::load_first(
                                           src + (b * channels + c) * plane + p0, pn)
                                             : _mm256_setzero_ps();
                        }
                        avx2::transpose8(r);
                        for (int64_t k = 0; k < pn; ++k)
                            _mm256_storeu_ps(pixel_rows[k] + c * tb + j0, r[k]);
                    }
            }
            // the padding pixels: their rows' lanes zero
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t yy = 0; yy < hp; ++yy) {
                const bool pad_row = yy < pad.top || yy >= pad.top + h;
                const auto lane_bytes = static_cast<size_t>(tile_lanes(batch, t)) * sizeof(float);
                for (int64_t xx = 0; xx < wp; ++xx)
                    if (pad_row || xx < pad.left || xx >= pad.left + w)
                        for (int64_t c = 0; c < channels; ++c)
                            std::memset(tiles + t * rows * tb + (yy * wp + xx) * pixel_floats
                                                + c * tb,
                                        0, lane_bytes);
            }
    }
}

void pack_conv_s8_tiles_avx2(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                             const spatial_pad &pad, int8_t *tiles, int num_threads) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t hp = h + pad.top + pad.bottom, wp = w + pad.left + pad.right;
    const int64_t rows = hp * wp * channels, plane = h * w, tiles_n = jit::tile_count(batch),
                  pblocks = (plane + 15) / 16;
    const int64_t pixel_bytes = channels * tb; // one padded pixel's rows
#pragma omp parallel num_threads(num_threads)
    {
        // Blocks of 16 consecutive pixels of a channel plane, across image
        // rows (a plane is contiguous in NCHW): narrow images fill the
        // transposes too.
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t pb = 0; pb < pblocks; ++pb) {
                const int64_t p0 = pb * 16, pn = std::min<int64_t>(16, plane - p0);
                int8_t *pixel_rows[16]; // where each pixel's rows go
                for (int64_t k = 0; k < pn; ++k) {
                    const int64_t y = (p0 + k) / w, xx = (p0 + k) % w;
                    pixel_rows[k] = tiles + t * rows * tb
                                    + ((y + pad.top) * wp + xx + pad.left) * pixel_bytes;
                }
                for (int64_t c = 0; c < channels; ++c)
                    for (int64_t j0 = 0; j0 < tb; j0 += 16) {
                        __m128i r[16];
                        for (int i = 0; i < 16; ++i) {
                            const int64_t b = t * tb + j0 + i;
                            const int8_t *in = x + (b * channels + c) * plane + p0;
                            if (b >= batch) {
                                r[i] = _mm_setzero_si128();
                            } else if (pn == 16) {
                                r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i *>(in));
                            } else {
                                alignas(16) int8_t staged[16] = {};
                                std::memcpy(staged, in, static_cast<size_t>(pn));
                                r[i] = _mm_load_si128(reinterpret_cast<const __m128i *>(staged));
                            }
                        }
                        avx2::transpose16_bytes(r);
                        for (int64_t k = 0; k < pn; ++k)
                            _mm_storeu_si128(
                                    reinterpret_cast<__m128i *>(pixel_rows[k] + c * tb + j0), r[k]);
                    }
            }
            // the padding pixels: all their rows zero
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t yy = 0; yy < hp; ++yy) {
                const bool pad_row = yy < pad.top || yy >= pad.top + h;
                for (int64_t xx = 0; xx < wp; ++xx)
                    if (pad_row || xx < pad.left || xx >= pad.left + w)
                        std::memset(tiles + t * rows * tb + (yy * wp + xx) * pixel_bytes, 0,
                                    static_cast<size_t>(pixel_bytes));
            }
    }
}

} // namespace qsp::detail

QSP_END_TARGET
