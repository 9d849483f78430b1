// AVX-512 versions of the tile layout passes (this file alone is compiled
// with the avx512_core flags: it runs only after CPU detection says so). Both passes are
// 16 x 16 float transposes in registers; at 90-98 % sparsity these passes,
// not the sparse kernels, are a large part of a step (DESIGN.md 3.6).
#include <immintrin.h>

#include <algorithm>

#include "primitives/tile_layout.hpp"

namespace qsp::detail {

namespace {

constexpr int64_t tb = jit::tile_batch;

// r[i] <- column i of the 16 x 16 matrix whose rows are r[0..15].
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
        }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

inline __mmask16 first(int64_t n) {
    return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

} // namespace

void pack_tiles_avx512(const float *src, int64_t batch, int64_t channels, float *tiles,
                       int num_threads) {
    const int64_t tiles_n = tile_count(batch), cblocks = (channels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
            const __mmask16 cmask = first(cn);
            float *tile = tiles + t * channels * tb;
            for (int64_t j0 = 0; j0 < tb; j0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i) {
                    const int64_t b = t * tb + j0 + i;
                    r[i] = b < batch ? _mm512_maskz_loadu_ps(cmask, src + b * channels + c0)
                                     : _mm512_setzero_ps();
                }
                transpose16(r);
                for (int64_t c = 0; c < cn; ++c)
                    _mm512_storeu_ps(tile + (c0 + c) * tb + j0, r[c]);
            }
        }
}

void unpack_tiles_avx512(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                         float *dst, int num_threads) {
    const int64_t tiles_n = tile_count(batch), cblocks = (channels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
            const __mmask16 cmask = first(cn);
            const __m512 b = bias ? _mm512_maskz_loadu_ps(cmask, bias + c0) : _mm512_setzero_ps();
            const float *tile = tiles + t * channels * tb;
            for (int64_t j0 = 0; j0 < tb && t * tb + j0 < batch; j0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i)
                    r[i] = i < cn ? _mm512_loadu_ps(tile + (c0 + i) * tb + j0)
                                  : _mm512_setzero_ps();
                transpose16(r);
                for (int64_t i = 0; i < 16 && t * tb + j0 + i < batch; ++i)
                    _mm512_mask_storeu_ps(dst + (t * tb + j0 + i) * channels + c0, cmask,
                                          _mm512_add_ps(r[i], b));
            }
        }
}

} // namespace qsp::detail
