// The AVX2 tier of the Conv2d tile packs (called only after CPU detection):
// blocks of batch elements x consecutive pixels of one channel plane
// (across image rows, so narrow images fill them too) transposed in
// registers; the portable loops read each value from another image
// (channels * h * w values apart), a cache line per value.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "primitives/passes/conv_tiles.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/simd_avx2.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail {

namespace {

// The skeleton of both packs: src[batch][channels][h][w] -> pixel-major
// tiles, by blocks of `block` consecutive pixels of a channel plane (across
// image rows: a plane is contiguous in NCHW, so narrow images fill the
// transposes too). write(t, c, p0, pn, rows, n) moves the first n lanes
// (lanes(t)) of tile t's block of pn pixels from p0 of channel c; rows[k]
// is where pixel p0 + k's rows start. The padding pixels' rows get n zeros.
template <int64_t block, typename T, typename write_t, typename lanes_t>
void pack_pixel_blocks(int64_t batch, int64_t channels, int64_t h, int64_t w,
                       const spatial_pad &pad, T *tiles, int num_threads, write_t write,
                       lanes_t lanes) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t hp = h + pad.top + pad.bottom, wp = w + pad.left + pad.right;
    const int64_t tile = hp * wp * channels * tb, plane = h * w, tiles_n = jit::tile_count(batch),
                  pblocks = (plane + block - 1) / block;
    const int64_t pixel = channels * tb; // one padded pixel's rows
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t pb = 0; pb < pblocks; ++pb) {
                const int64_t p0 = pb * block, pn = std::min<int64_t>(block, plane - p0);
                const int64_t n = lanes(t);
                T *rows[block];
                for (int64_t k = 0; k < pn; ++k) {
                    const int64_t y = (p0 + k) / w, xx = (p0 + k) % w;
                    rows[k] = tiles + t * tile + ((y + pad.top) * wp + xx + pad.left) * pixel;
                }
                for (int64_t c = 0; c < channels; ++c)
                    write(t, c, p0, pn, rows, n);
            }
#pragma omp for collapse(2) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t yy = 0; yy < hp; ++yy) {
                const bool pad_row = yy < pad.top || yy >= pad.top + h;
                const auto bytes = static_cast<size_t>(lanes(t)) * sizeof(T);
                for (int64_t xx = 0; xx < wp; ++xx)
                    if (pad_row || xx < pad.left || xx >= pad.left + w)
                        for (int64_t c = 0; c < channels; ++c)
                            std::memset(tiles + t * tile + (yy * wp + xx) * pixel + c * tb, 0,
                                        bytes);
            }
    }
}

} // namespace

void pack_conv_tiles_avx2(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                          const spatial_pad &pad, float *tiles, int num_threads) {
    const int64_t plane = h * w;
    const auto lanes = [batch](int64_t t) { return tile_lanes(batch, t); };
    // 8 batch elements x 8 pixels per transpose; the lanes kernels read
    pack_pixel_blocks<8>(
            batch, channels, h, w, pad, tiles, num_threads,
            [=](int64_t t, int64_t c, int64_t p0, int64_t pn, float *const *rows, int64_t n) {
                for (int64_t j0 = 0; j0 < n; j0 += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; ++i) {
                        const int64_t b = t * jit::tile_batch + j0 + i;
                        r[i] = b < batch
                                       ? avx2::load_first(src + (b * channels + c) * plane + p0, pn)
                                       : _mm256_setzero_ps();
                    }
                    avx2::transpose8(r);
                    for (int64_t k = 0; k < pn; ++k)
                        _mm256_storeu_ps(rows[k] + c * jit::tile_batch + j0, r[k]);
                }
            },
            lanes);
}

void unpack_conv_tiles_avx2(const float *tiles, int64_t batch, int64_t channels, int64_t pixels,
                            const float *bias, float *dst, int num_threads) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t rows = pixels * channels, tiles_n = jit::tile_count(batch),
                  pblocks = (pixels + 7) / 8;
    // 8 pixels x 8 batch elements per transpose, all channels of a pixel
    // block inside; the portable loop reads each value channels * 256 bytes
    // after the last (it was 10 % of a batch-1000 CNN's tuning, profiled).
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t pb = 0; pb < pblocks; ++pb)
            for (int64_t c = 0; c < channels; ++c) {
                const int64_t p0 = pb * 8, pn = std::min<int64_t>(8, pixels - p0);
                const __m256 bs = _mm256_set1_ps(bias ? bias[c] : 0.f);
                for (int64_t j0 = 0; j0 < tb && t * tb + j0 < batch; j0 += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; ++i)
                        r[i] = i < pn ? _mm256_loadu_ps(
                                       tiles + (t * rows + (p0 + i) * channels + c) * tb + j0)
                                      : _mm256_setzero_ps();
                    avx2::transpose8(r);
                    for (int64_t i = 0; i < 8 && t * tb + j0 + i < batch; ++i)
                        avx2::store_first(dst + ((t * tb + j0 + i) * channels + c) * pixels + p0,
                                          bias ? _mm256_add_ps(r[i], bs) : r[i], pn);
                }
            }
}

void pack_conv_s8_tiles_avx2(const int8_t *x, int64_t batch, int64_t channels, int64_t h, int64_t w,
                             const spatial_pad &pad, int8_t *tiles, int32_t *plane_sums,
                             int num_threads) {
    const int64_t plane = h * w;
    if (plane_sums) column_sums_s8(x, batch, channels * plane, plane_sums, num_threads);
    // 16 batch elements x 16 pixels per transpose; all 64 lanes (the s8
    // SDDMM reads whole rows)
    pack_pixel_blocks<16>(
            batch, channels, h, w, pad, tiles, num_threads,
            [=](int64_t t, int64_t c, int64_t p0, int64_t pn, int8_t *const *rows, int64_t n) {
                for (int64_t j0 = 0; j0 < n; j0 += 16) {
                    __m128i r[16];
                    for (int i = 0; i < 16; ++i) {
                        const int64_t b = t * jit::tile_batch + j0 + i;
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
                                reinterpret_cast<__m128i *>(rows[k] + c * jit::tile_batch + j0),
                                r[k]);
                }
            },
            [](int64_t) { return jit::tile_batch; });
}

} // namespace qsp::detail

QSP_END_TARGET
