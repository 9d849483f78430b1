// The AVX-512 tier of the Conv2d layout passes (called only after CPU
// detection): 16 x 16 transposes over (batch, w) for one channel and image
// row; pixel-major rows are written 16 at a time, channels * 256 bytes apart.
#include <immintrin.h>

#include <algorithm>

#include "primitives/passes/conv_tiles.hpp"
#include "primitives/passes/simd_avx512.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail {

namespace avx512 {
namespace {

constexpr int64_t tb = jit::tile_batch;

// v[(c * pixels + p) / inner] for p in [p0, p0 + n) as 16 lanes (0 past
// n): one load when inner is 1, one value when the 16 share it (the
// forward's per-channel terms), else lane by lane without a division. (A
// division per lane, stored lane by lane and reloaded as a vector, had
// cost half the unpack.)
inline __m512i per_pixel(const int32_t *v, int64_t inner, int64_t c, int64_t pixels, int64_t p0,
                         int64_t n) {
    const int64_t first = c * pixels + p0;
    const __mmask16 lanes = first_lanes(n);
    if (inner == 1) return _mm512_maskz_loadu_epi32(lanes, v + first);
    int64_t o = first / inner, left = inner - first % inner;
    if (left >= n) return _mm512_maskz_set1_epi32(lanes, v[o]);
    alignas(64) int32_t out[16] = {};
    for (int64_t k = 0; k < n; ++k) {
        out[k] = v[o];
        if (--left == 0) ++o, left = inner;
    }
    return _mm512_load_si512(out);
}
inline __m512 per_pixel(const float *v, int64_t inner, int64_t c, int64_t pixels, int64_t p0,
                        int64_t n) {
    return _mm512_castsi512_ps(
            per_pixel(reinterpret_cast<const int32_t *>(v), inner, c, pixels, p0, n));
}

// body(t, y, x) for every padded pixel outside the image, over all tiles.
template <typename body_t>
void for_padding_pixels(int64_t tiles, int64_t h, int64_t w, const spatial_pad &pad, body_t body) {
    const int64_t hp = h + pad.top + pad.bottom, wp = w + pad.left + pad.right;
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < tiles; ++t)
        for (int64_t y = 0; y < hp; ++y) {
            const bool pad_row = y < pad.top || y >= pad.top + h;
            for (int64_t x = 0; x < wp; ++x)
                if (pad_row || x < pad.left || x >= pad.left + w) body(t, y, x);
        }
}

} // namespace
} // namespace avx512

using avx512::first_lanes;
using avx512::transpose16;

void pack_conv_tiles_avx512(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                            const spatial_pad &pad, float *tiles, int num_threads) {
    const int64_t tb = jit::tile_batch, wp = w + pad.left + pad.right,
                  rows = (h + pad.top + pad.bottom) * wp * channels, plane = h * w,
                  tiles_n = jit::tile_count(batch), wblocks = (w + 15) / 16;
#pragma omp parallel num_threads(num_threads)
    {
// One block of 16 image columns of one image row at a time, all channels
// inside: its destination (16 pixels x channels rows) is contiguous.
#pragma omp for collapse(3) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t y = 0; y < h; ++y)
                for (int64_t wb = 0; wb < wblocks; ++wb)
                    for (int64_t c = 0; c < channels; ++c) {
                        const int64_t x0 = wb * 16, xn = std::min<int64_t>(16, w - x0);
                        const __mmask16 xmask = first_lanes(xn);
                        float *base = tiles
                                      + (t * rows + ((y + pad.top) * wp + x0 + pad.left) * channels
                                         + c) * tb;
                        for (int64_t j0 = 0; j0 < tile_lanes(batch, t); j0 += 16) {
                            __m512 r[16];
                            for (int i = 0; i < 16; ++i) {
                                const int64_t b = t * tb + j0 + i;
                                r[i] = b < batch ? _mm512_maskz_loadu_ps(
                                               xmask, src + (b * channels + c) * plane + y * w + x0)
                                                 : _mm512_setzero_ps();
                            }
                            transpose16(r);
                            for (int64_t k = 0; k < xn; ++k)
                                _mm512_storeu_ps(base + k * channels * tb + j0, r[k]);
                        }
                    }
        avx512::for_padding_pixels(tiles_n, h, w, pad, [&](int64_t t, int64_t y, int64_t x) {
            float *row = tiles + (t * rows + (y * wp + x) * channels) * tb;
            for (int64_t c = 0; c < channels; ++c)
                for (int64_t j0 = 0; j0 < tile_lanes(batch, t); j0 += 16)
                    _mm512_storeu_ps(row + c * tb + j0, _mm512_setzero_ps());
        });
    }
}

void unpack_conv_tiles_avx512(const float *tiles, int64_t batch, int64_t channels, int64_t pixels,
                              const float *bias, float *dst, int num_threads) {
    const int64_t tb = jit::tile_batch, rows = pixels * channels, tiles_n = jit::tile_count(batch),
                  pblocks = (pixels + 15) / 16;
    // One block of 16 pixels at a time, all channels inside: its source
    // (16 pixels x channels rows) is contiguous.
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t pb = 0; pb < pblocks; ++pb)
            for (int64_t c = 0; c < channels; ++c) {
                const int64_t p0 = pb * 16, pn = std::min<int64_t>(16, pixels - p0);
                const __mmask16 pmask = first_lanes(pn);
                const __m512 bs = _mm512_set1_ps(bias ? bias[c] : 0.f);
                for (int64_t j0 = 0; j0 < tb && t * tb + j0 < batch; j0 += 16) {
                    __m512 r[16];
                    for (int i = 0; i < 16; ++i)
                        r[i] = i < pn ? _mm512_loadu_ps(
                                       tiles + (t * rows + (p0 + i) * channels + c) * tb + j0)
                                      : _mm512_setzero_ps();
                    transpose16(r);
                    for (int64_t i = 0; i < 16 && t * tb + j0 + i < batch; ++i)
                        _mm512_mask_storeu_ps(dst + ((t * tb + j0 + i) * channels + c) * pixels
                                                      + p0,
                                              pmask, bias ? _mm512_add_ps(r[i], bs) : r[i]);
                }
            }
}

namespace {

// Quad (per_word 4) or pair (2) tiles (conv_tiles.hpp): per batch element
// and 16 columns, the words of channels per_word q.. as 16 dwords (a pair's
// channels widened to u16 by the zeros between them), transposed to rows.
template <int per_word>
void pack_conv_word_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, int64_t h,
                                 int64_t w, const spatial_pad &pad, uint8_t *tiles,
                                 int num_threads) {
    const int64_t tb = jit::tile_batch, wp = w + pad.left + pad.right,
                  words_n = (channels + per_word - 1) / per_word,
                  rows = (h + pad.top + pad.bottom) * wp * words_n, plane = h * w,
                  tiles_n = jit::tile_count(batch), wblocks = (w + 15) / 16;
    // x -> x + 128 in each channel's low byte (a pair's high bytes stay 0)
    const __m512i flip =
            _mm512_set1_epi32(static_cast<int>(per_word == 4 ? 0x80808080u : 0x00800080u));
    uint32_t *words = reinterpret_cast<uint32_t *>(tiles);
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for collapse(3) schedule(static)
        for (int64_t t = 0; t < tiles_n; ++t)
            for (int64_t y = 0; y < h; ++y)
                for (int64_t wb = 0; wb < wblocks; ++wb)
                    for (int64_t q = 0; q < words_n; ++q) {
                        const int64_t x0 = wb * 16, xn = std::min<int64_t>(16, w - x0);
                        const __mmask16 xmask = first_lanes(xn);
                        uint32_t *base =
                                words
                                + (t * rows + ((y + pad.top) * wp + x0 + pad.left) * words_n + q)
                                          * tb;
                        for (int64_t j0 = 0; j0 < tile_lanes(batch, t); j0 += 16) {
                            __m512 r[16];
                            for (int i = 0; i < 16; ++i) {
                                const int64_t b = t * tb + j0 + i;
                                // the 4 bytes of each word: a quad's channels, or a
                                // pair's each followed by a zero byte
                                __m128i a[4] = {_mm_setzero_si128(), _mm_setzero_si128(),
                                                _mm_setzero_si128(), _mm_setzero_si128()};
                                for (int k = 0; k < per_word; ++k) {
                                    const int64_t c = per_word * q + k;
                                    if (b < batch && c < channels)
                                        a[k * (4 / per_word)] = _mm_maskz_loadu_epi8(
                                                xmask, x + (b * channels + c) * plane + y * w + x0);
                                }
                                // 16 dwords, one per w
                                const __m128i lo01 = _mm_unpacklo_epi8(a[0], a[1]),
                                              hi01 = _mm_unpackhi_epi8(a[0], a[1]),
                                              lo23 = _mm_unpacklo_epi8(a[2], a[3]),
                                              hi23 = _mm_unpackhi_epi8(a[2], a[3]);
                                __m512i v = _mm512_castsi128_si512(_mm_unpacklo_epi16(lo01, lo23));
                                v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(lo01, lo23), 1);
                                v = _mm512_inserti32x4(v, _mm_unpacklo_epi16(hi01, hi23), 2);
                                v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(hi01, hi23), 3);
                                r[i] = _mm512_castsi512_ps(v);
                            }
                            transpose16(r); // moves 32-bit lanes bit for bit
                            for (int64_t k = 0; k < xn; ++k)
                                _mm512_storeu_si512(
                                        base + k * words_n * tb + j0,
                                        _mm512_xor_si512(_mm512_castps_si512(r[k]), flip));
                        }
                    }
        avx512::for_padding_pixels(tiles_n, h, w, pad, [&](int64_t t, int64_t y, int64_t xx) {
            uint32_t *row = words + (t * rows + (y * wp + xx) * words_n) * tb;
            for (int64_t q = 0; q < words_n; ++q)
                for (int64_t j0 = 0; j0 < tile_lanes(batch, t); j0 += 16)
                    _mm512_storeu_si512(row + q * tb + j0, flip); // x = 0
        });
    }
}

} // namespace

void pack_conv_quad_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, int64_t h,
                                 int64_t w, const spatial_pad &pad, uint8_t *tiles,
                                 int num_threads) {
    pack_conv_word_tiles_avx512<4>(x, batch, channels, h, w, pad, tiles, num_threads);
}

void pack_conv_pair_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, int64_t h,
                                 int64_t w, const spatial_pad &pad, uint8_t *tiles,
                                 int num_threads) {
    pack_conv_word_tiles_avx512<2>(x, batch, channels, h, w, pad, tiles, num_threads);
}

void pack_conv_s8_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, int64_t h,
                               int64_t w, const spatial_pad &pad, int8_t *tiles,
                               int32_t *plane_sums, int num_threads) {
    const int64_t tb = jit::tile_batch, wp = w + pad.left + pad.right,
                  rows = (h + pad.top + pad.bottom) * wp * channels, plane = h * w,
                  tiles_n = jit::tile_count(batch), wblocks = (w + 15) / 16;
    auto *out = reinterpret_cast<uint8_t *>(tiles);
#pragma omp parallel num_threads(num_threads)
    {
// One image row of one channel at a time, every tile's, its column blocks
// in turn: each image's line is read whole while it is in L1 (column
// blocks outside the channels read each line again from L2), the row's
// destination (w pixels x channels rows) is one contiguous run per tile,
// and the row's plane sums are this thread's alone.
#pragma omp for collapse(2) schedule(static)
        for (int64_t y = 0; y < h; ++y)
            for (int64_t c = 0; c < channels; ++c) {
                int32_t *sums = plane_sums ? plane_sums + c * plane + y * w : nullptr;
                if (sums) std::fill(sums, sums + w, 0);
                for (int64_t t = 0; t < tiles_n; ++t)
                    for (int64_t wb = 0; wb < wblocks; ++wb) {
                        const int64_t x0 = wb * 16;
                        avx512::transpose_64x16_bytes(
                                x + (t * tb * channels + c) * plane + y * w + x0, channels * plane,
                                batch - t * tb, std::min<int64_t>(16, w - x0),
                                out
                                        + (t * rows
                                           + ((y + pad.top) * wp + x0 + pad.left) * channels + c)
                                                  * tb,
                                channels * tb, _mm512_setzero_si512(), sums ? sums + x0 : nullptr);
                    }
            }
        avx512::for_padding_pixels(tiles_n, h, w, pad, [&](int64_t t, int64_t y, int64_t xx) {
            int8_t *row = tiles + (t * rows + (y * wp + xx) * channels) * tb;
            for (int64_t c = 0; c < channels; ++c)
                _mm512_storeu_si512(row + c * tb, _mm512_setzero_si512());
        });
    }
}

void unpack_conv_s32_tiles_avx512(const int32_t *tiles, int64_t batch, int64_t channels,
                                  int64_t pixels, const int32_t *correction,
                                  int64_t correction_inner, const float *scale, int64_t scale_inner,
                                  const float *bias, float *dst, int num_threads) {
    const int64_t tb = jit::tile_batch, rows = pixels * channels, tiles_n = jit::tile_count(batch),
                  pblocks = (pixels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t pb = 0; pb < pblocks; ++pb)
            for (int64_t c = 0; c < channels; ++c) {
                const int64_t p0 = pb * 16, pn = std::min<int64_t>(16, pixels - p0);
                const __mmask16 pmask = first_lanes(pn);
                const __m512i corr =
                        avx512::per_pixel(correction, correction_inner, c, pixels, p0, pn);
                const __m512 sc = avx512::per_pixel(scale, scale_inner, c, pixels, p0, pn),
                             bs = _mm512_set1_ps(bias ? bias[c] : 0.f);
                for (int64_t j0 = 0; j0 < tb && t * tb + j0 < batch; j0 += 16) {
                    __m512 r[16];
                    for (int i = 0; i < 16; ++i)
                        r[i] = i < pn ? _mm512_castsi512_ps(_mm512_loadu_si512(
                                       tiles + (t * rows + (p0 + i) * channels + c) * tb + j0))
                                      : _mm512_setzero_ps();
                    transpose16(r);
                    for (int64_t i = 0; i < 16 && t * tb + j0 + i < batch; ++i) {
                        const __m512i exact = _mm512_sub_epi32(_mm512_castps_si512(r[i]), corr);
                        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), sc);
                        if (bias) y = _mm512_add_ps(y, bs);
                        _mm512_mask_storeu_ps(
                                dst + ((t * tb + j0 + i) * channels + c) * pixels + p0, pmask, y);
                    }
                }
            }
}

} // namespace qsp::detail

QSP_END_TARGET
