// The AVX2 tier of the f32 width plane pack (called only after CPU
// detection), for planes without column phases. Each 8-float vector of the
// padded row is built in registers — zeros, image columns, or both across a
// boundary (a plain load and a mask) — and stored whole: rows are short
// (9-30 floats in a small ResNet), so the portable loop's three fills and
// a copy per row, not memory, bounded it. AMD microcodes masked stores and
// slows masked loads (both were half this pass's time on 7-column rows):
// here they are used once per plane and at the tensor's two ends only.
#include <immintrin.h>

#include "primitives/passes/simd_avx2.hpp"
#include "primitives/passes/width_planes.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail {

namespace {

// All-ones in lanes i with from <= i < to (any int64 bounds).
inline __m256i lanes_between(int64_t from, int64_t to) {
    const auto clamp = [](int64_t v) { return static_cast<int>(v < -1 ? -1 : v > 8 ? 8 : v); };
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(clamp(to)), lane),
                            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(clamp(from) - 1)));
}

} // namespace

bool pack_width_planes_avx2(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                            const spatial_pad &pad, const width_plane &plane, float *dst,
                            int num_threads) {
    const int64_t planes = batch * channels, row_len = plane.row_len(), left = pad.left;
    const float *src_end = src + planes * h * w;
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    int bad = 0;
    // One plane per iteration: its rows are consecutive in dst, so a row's
    // last vector is stored whole, spilling into the next row before that
    // row is written; only a plane's last row (the next plane may be another
    // thread's) ends with a masked store.
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
    for (int64_t p = 0; p < planes; ++p) {
        __m256i nonfinite = _mm256_setzero_si256();
        for (int64_t r = 0; r < plane.rows; ++r) {
            float *row = dst + p * plane.size() + r * row_len;
            const int64_t y = r - pad.top, row_end = r + 1 < plane.rows ? row_len + 7 : row_len;
            const bool image_row = y >= 0 && y < h;
            const float *in = image_row ? src + (p * h + y) * w : nullptr;
            for (int64_t o = 0; o < row_len; o += 8) {
                const int64_t x = o - left; // the image column of lane 0
                __m256 v = _mm256_setzero_ps();
                if (image_row && x + 8 > 0 && x < w) {
                    if (x >= 0 && x + 8 <= w) {
                        v = _mm256_loadu_ps(in + x);
                    } else {
                        // lanes past either edge of the image row are zero;
                        // read plainly inside the tensor, masked (so never a
                        // fault) at its two ends
                        const __m256i inside = lanes_between(-x, w - x);
                        const bool in_bounds = x >= src - in && x + 8 <= src_end - in;
                        v = in_bounds ? _mm256_and_ps(_mm256_loadu_ps(in + x),
                                                      _mm256_castsi256_ps(inside))
                                      : _mm256_maskload_ps(in + x, inside);
                    }
                    const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exponent);
                    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(e, exponent));
                }
                avx2::store_first(row + o, v, row_end - o);
            }
        }
        bad |= !_mm256_testz_si256(nonfinite, nonfinite);
    }
    return !bad;
}

} // namespace qsp::detail

QSP_END_TARGET
