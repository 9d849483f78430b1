// The AVX2 tier of the f32 width plane pack (called only after CPU
// detection), for planes without column phases or with two (a horizontal
// stride of 2: every other column gathered by one shuffle and one
// permute per 16 columns). Each 8-float vector of the
// padded row is built in registers — zeros, image columns, or both across a
// boundary (a plain load and a mask) — and stored whole: rows are short
// (9-30 floats in a small ResNet), so the portable loop's three fills and
// a copy per row, not memory, bounded it. AMD microcodes masked stores and
// slows masked loads (both were half this pass's time on 7-column rows):
// here they are used once per plane and at the tensor's two ends only.
#include <immintrin.h>

#include <algorithm>
#include <vector>

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

// How image columns x..x+7 of a row are read: the same in every row, so
// decided once per call (deciding per vector cost more than the copy).
struct column_read {
    enum kind_t : int32_t { zeros, whole, masked } kind;
    int32_t lanes[8]; // masked: all-ones in the lanes inside [0, w)
    int64_t x;
};

column_read read_of(int64_t x, int64_t w) {
    column_read c{column_read::whole, {}, x};
    if (x + 8 <= 0 || x >= w)
        c.kind = column_read::zeros;
    else if (x < 0 || x + 8 > w) {
        c.kind = column_read::masked;
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(c.lanes), lanes_between(-x, w - x));
    }
    return c;
}

} // namespace

bool pack_width_planes_avx2(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                            const spatial_pad &pad, const width_plane &plane, float *dst,
                            int num_threads) {
    const int64_t planes = batch * channels, row_len = plane.row_len(), left = pad.left;
    const int64_t phases = plane.phases, phase_len = plane.phase_len;
    const int64_t vectors = (phase_len + 7) / 8;
    const float *src_end = src + planes * h * w;
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    // Per phase and vector of a run, its read (stride 2: two, of 16 columns).
    const int64_t reads_per_vector = phases == 1 ? 1 : 2;
    std::vector<column_read> reads;
    reads.reserve(static_cast<size_t>(phases * vectors * reads_per_vector));
    for (int64_t ph = 0; ph < phases; ++ph)
        for (int64_t o = 0; o < phase_len; o += 8) {
            const int64_t x = phases == 1 ? o - left : ph + 2 * o - left;
            reads.push_back(read_of(x, w));
            if (phases == 2) reads.push_back(read_of(x + 8, w));
        }
    // Image columns per `r` of the row at `in` (nullptr: a padding row),
    // zero outside [0, w): read plainly inside the tensor, masked (so never
    // a fault) at its two ends.
    const auto columns = [&](const float *in, const column_read &r) {
        if (!in || r.kind == column_read::zeros) return _mm256_setzero_ps();
        if (r.kind == column_read::whole) return _mm256_loadu_ps(in + r.x);
        const __m256i inside = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(r.lanes));
        return r.x >= src - in && r.x + 8 <= src_end - in
                       ? _mm256_and_ps(_mm256_loadu_ps(in + r.x), _mm256_castsi256_ps(inside))
                       : _mm256_maskload_ps(in + r.x, inside);
    };
    int bad = 0;
    // One plane per iteration: its rows (and a row's phases) are consecutive
    // in dst, so a run's last vector is stored whole, spilling into the next
    // runs before they are written; only where the plane ends within the
    // spill (the next plane may be another thread's) is it masked.
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : bad)
    for (int64_t p = 0; p < planes; ++p) {
        __m256i nonfinite = _mm256_setzero_si256();
        for (int64_t r = 0; r < plane.rows; ++r) {
            const int64_t y = r - pad.top;
            const float *in = y >= 0 && y < h ? src + (p * h + y) * w : nullptr;
            const column_read *read = reads.data();
            for (int64_t ph = 0; ph < phases; ++ph) {
                float *run = dst + p * plane.size() + r * row_len + ph * phase_len;
                // whole vectors while the plane goes on past the spill
                const int64_t left_in_plane = plane.size() - (r * row_len + ph * phase_len);
                const int64_t run_end = std::min(phase_len + 7, left_in_plane);
                for (int64_t o = 0; o < phase_len; o += 8, read += reads_per_vector) {
                    __m256 v;
                    if (phases == 1) {
                        v = columns(in, read[0]);
                    } else { // 2: every other column from ph, 16 columns a vector
                        const __m256 a = columns(in, read[0]), b = columns(in, read[1]);
                        // a0 a2 b0 b2 | a4 a6 b4 b6 -> a0 a2 a4 a6 b0 b2 b4 b6
                        v = _mm256_castpd_ps(_mm256_permute4x64_pd(
                                _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                                _MM_SHUFFLE(3, 1, 2, 0)));
                    }
                    const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exponent);
                    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi32(e, exponent));
                    avx2::store_first(run + o, v, run_end - o);
                }
            }
        }
        bad |= !_mm256_testz_si256(nonfinite, nonfinite);
    }
    return !bad;
}

} // namespace qsp::detail

QSP_END_TARGET
