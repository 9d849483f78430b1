// The AVX2 tier of the f32 layout passes (called only after CPU detection):
// 8 x 8 transposes in registers, as tile_layout_avx512.cpp does with 16 x 16.
#include <immintrin.h>

#include <algorithm>

#include "primitives/passes/simd_avx2.hpp"
#include "primitives/passes/tile_layout.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail {

void pack_tiles_avx2(const float *src, int64_t batch, int64_t channels, float *tiles,
                     int num_threads) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t tiles_n = tile_count(batch), cblocks = (channels + 7) / 8;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 8, cn = std::min<int64_t>(8, channels - c0);
            float *tile = tiles + t * channels * tb;
            for (int64_t j0 = 0; j0 < tile_lanes(batch, t); j0 += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; ++i) {
                    const int64_t b = t * tb + j0 + i;
                    r[i] = b < batch ? avx2::load_first(src + b * channels + c0, cn)
                                     : _mm256_setzero_ps();
                }
                avx2::transpose8(r);
                for (int64_t c = 0; c < cn; ++c)
                    _mm256_storeu_ps(tile + (c0 + c) * tb + j0, r[c]);
            }
        }
}

void unpack_tiles_avx2(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                       float *dst, int num_threads, int64_t bias_inner) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t tiles_n = tile_count(batch), cblocks = (channels + 7) / 8;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 8, cn = std::min<int64_t>(8, channels - c0);
            __m256 b = _mm256_setzero_ps();
            if (bias && bias_inner == 1) {
                b = avx2::load_first(bias + c0, cn);
            } else if (bias) {
                alignas(32) float lanes[8] = {};
                for (int64_t k = 0; k < cn; ++k)
                    lanes[k] = bias[(c0 + k) / bias_inner];
                b = _mm256_load_ps(lanes);
            }
            const float *tile = tiles + t * channels * tb;
            for (int64_t j0 = 0; j0 < tb && t * tb + j0 < batch; j0 += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; ++i)
                    r[i] = i < cn ? _mm256_loadu_ps(tile + (c0 + i) * tb + j0)
                                  : _mm256_setzero_ps();
                avx2::transpose8(r);
                for (int64_t i = 0; i < 8 && t * tb + j0 + i < batch; ++i)
                    avx2::store_first(dst + (t * tb + j0 + i) * channels + c0,
                                      _mm256_add_ps(r[i], b), cn);
            }
        }
}

} // namespace qsp::detail

QSP_END_TARGET
