// The AVX-512 tier of the f32 layout passes (called only after CPU
// detection): 16 x 16 float transposes in registers.
#include <immintrin.h>

#include <algorithm>

#include "primitives/passes/simd_avx512.hpp"
#include "primitives/passes/tile_layout.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail {

namespace avx512 {
namespace {
constexpr int64_t tb = jit::tile_batch;
inline __mmask16 first(int64_t n) {
    return first_lanes(n);
}
} // namespace
} // namespace avx512

using avx512::first;
using avx512::tb;
using avx512::transpose16;

void pack_tiles_avx512(const float *src, int64_t batch, int64_t channels, float *tiles,
                       int num_threads) {
    const int64_t tiles_n = tile_count(batch), cblocks = (channels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
            const __mmask16 cmask = first(cn);
            float *tile = tiles + t * channels * tb;
            for (int64_t j0 = 0; j0 < tile_lanes(batch, t); j0 += 16) {
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
                         float *dst, int num_threads, int64_t bias_inner) {
    const int64_t tiles_n = tile_count(batch), cblocks = (channels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
            const __mmask16 cmask = first(cn);
            __m512 b = _mm512_setzero_ps();
            if (bias && bias_inner == 1) {
                b = _mm512_maskz_loadu_ps(cmask, bias + c0);
            } else if (bias) {
                alignas(64) float lanes[16] = {};
                for (int64_t k = 0; k < cn; ++k)
                    lanes[k] = bias[(c0 + k) / bias_inner];
                b = _mm512_load_ps(lanes);
            }
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

QSP_END_TARGET
