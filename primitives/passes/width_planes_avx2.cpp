// The AVX2 tiers of the width plane packs (called only after CPU
// detection): f32 planes and s8 channel-pair planes, each without column
// phases or with two (a horizontal stride of 2: every other column
// gathered by one shuffle and one permute per 16 columns), and
// backward-data's stride-2 zip of two column phases into rows.
//
// f32: each 8-float vector of the padded row is built in registers —
// zeros, image columns, or both across a boundary (a plain load and a
// mask) — and stored whole: rows are short (9-30 floats in a small
// ResNet), so the portable loop's three fills and a copy per row, not
// memory, bounded it. AMD microcodes masked stores and slows masked loads
// (both were half this pass's time on 7-column rows): here they are used
// where a plane ends and at the tensor's two ends only. The pairs keep to
// the same rule with whole vectors and plain copies.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
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

namespace {

constexpr uint32_t pair_zero = 0x00800080u; // two x = 0 as u16 (x + 128)

// out[from, to) = two x = 0, 8 words a store (the last ones plain).
inline void fill_pair_zeros(uint32_t *out, int64_t from, int64_t to) {
    const __m256i zero = _mm256_set1_epi32(static_cast<int>(pair_zero));
    int64_t j = from;
    for (; j + 8 <= to; j += 8)
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + j), zero);
    for (; j < to; ++j)
        out[j] = pair_zero;
}

// The words of 8 columns: u16 (lo + 128) | u16 (hi + 128) << 16.
inline __m256i pair_words(__m128i lo8, __m128i hi8) {
    const __m128i bytes = _mm_xor_si128(_mm_unpacklo_epi8(lo8, hi8), _mm_set1_epi8(-128));
    return _mm256_cvtepu8_epi16(bytes);
}

// out[0, w) = the words of columns [0, w) of rows lo and hi (null: x = 0).
// Whole vectors where they may: reading up to lo + w + 7 (hi too) while
// that is before src_end, writing up to out + w + 7 while that is before
// out_end (the caller writes the columns past w after); else the last
// columns go through a buffer.
inline void pair_row(uint32_t *out, const uint32_t *out_end, const int8_t *lo, const int8_t *hi,
                     const int8_t *src_end, int64_t w) {
    const bool read_past = (hi ? hi : lo) + w + 8 <= src_end, write_past = out + w + 8 <= out_end;
    const int64_t whole = read_past && write_past ? w : w / 8 * 8;
    int64_t x = 0;
    for (; x < whole; x += 8) {
        const __m128i l = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(lo + x));
        const __m128i h = hi ? _mm_loadl_epi64(reinterpret_cast<const __m128i *>(hi + x))
                             : _mm_setzero_si128();
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + x), pair_words(l, h));
    }
    if (x >= w) return;
    const size_t n = static_cast<size_t>(w - x);
    int64_t l = 0, h = 0;
    std::memcpy(&l, lo + x, n);
    if (hi) std::memcpy(&h, hi + x, n);
    avx2::store_first_bytes(out + x, pair_words(_mm_cvtsi64_si128(l), _mm_cvtsi64_si128(h)),
                            static_cast<int64_t>(n) * 4);
}

} // namespace

void pack_width_pairs_avx2(const int8_t *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                           const spatial_pad &pad, const width_plane &plane, uint32_t *dst,
                           int num_threads) {
    const int64_t pairs = (channels + 1) / 2, row_len = plane.row_len();
    const int64_t phases = plane.phases, phase_len = plane.phase_len;
    // A row with two column phases: its two channels' bytes are copied into
    // rows in padded column order (zeros around, x = 0), whose 16 columns
    // from 2j hold the 8 even and 8 odd columns from j; a byte shuffle splits
    // them. (It measured as fast as building the row's words whole and
    // splitting those: at these row lengths the cost is per row, about twice
    // stride 1's.)
    const int64_t chunks = (phase_len + 7) / 8;
    const int64_t byte_row = std::max(16 * chunks, pad.left + w) + 16;
    const int8_t *src_end = src + batch * channels * h * w;
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<int8_t> bytes(phases == 2 ? static_cast<size_t>(2 * byte_row) : 0, 0);
        int8_t *const lo_bytes = bytes.data(), *const hi_bytes = lo_bytes + byte_row;
        const __m128i evens_first =
                _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        // a plane per iteration: a row's spill into the rows after it stays
        // with the thread that writes them (after it)
#pragma omp for schedule(static)
        for (int64_t p = 0; p < batch * pairs; ++p)
            for (int64_t r = 0; r < plane.rows; ++r) {
                uint32_t *row = dst + p * plane.size() + r * row_len;
                const int64_t y = r - pad.top;
                if (y < 0 || y >= h) {
                    fill_pair_zeros(row, 0, row_len);
                    continue;
                }
                const int64_t b = p / pairs, c = 2 * (p % pairs);
                const int8_t *lo = src + ((b * channels + c) * h + y) * w;
                const int8_t *hi = c + 1 < channels ? lo + h * w : nullptr; // missing: x = 0
                if (phases == 1) {
                    fill_pair_zeros(row, 0, pad.left);
                    pair_row(row + pad.left, dst + (p + 1) * plane.size(), lo, hi, src_end, w);
                    fill_pair_zeros(row, pad.left + w, row_len);
                    continue;
                }
                std::memcpy(lo_bytes + pad.left, lo, static_cast<size_t>(w));
                if (hi)
                    std::memcpy(hi_bytes + pad.left, hi, static_cast<size_t>(w));
                else
                    std::memset(hi_bytes + pad.left, 0, static_cast<size_t>(w));
                auto split = [&](int64_t j, __m128i &l, __m128i &hv) {
                    l = _mm_shuffle_epi8(
                            _mm_loadu_si128(reinterpret_cast<const __m128i *>(lo_bytes + 2 * j)),
                            evens_first);
                    hv = _mm_shuffle_epi8(
                            _mm_loadu_si128(reinterpret_cast<const __m128i *>(hi_bytes + 2 * j)),
                            evens_first);
                };
                // evens to [0, phase_len), odds to [phase_len, 2 phase_len):
                // every even chunk first (a spill into the odds is written
                // over after it), then the odds, spilling into the plane's
                // next row (written after it), cut at the plane's end
                const uint32_t *plane_end = dst + (p + 1) * plane.size();
                __m128i l, hv;
                for (int64_t j = 0; j < phase_len; j += 8) {
                    split(j, l, hv);
                    avx2::store_first_bytes(row + j, pair_words(l, hv), (row_len - j) * 4);
                }
                for (int64_t j = 0; j < phase_len; j += 8) {
                    split(j, l, hv);
                    uint32_t *out = row + phase_len + j;
                    const __m256i odd =
                            pair_words(_mm_unpackhi_epi64(l, l), _mm_unpackhi_epi64(hv, hv));
                    if (out + 8 <= plane_end)
                        _mm256_storeu_si256(reinterpret_cast<__m256i *>(out), odd);
                    else
                        avx2::store_first_bytes(out, odd, (phase_len - j) * 4);
                }
            }
    }
}

// Stride 2: row[2j + w0] = phase[j], 8 even and 8 odd columns zipped into
// two vectors (the portable loop stored one float per instruction, 8 bytes
// apart). A row's last vectors are masked: the rows between are the other
// row phase's, written in another call.
void interleave_width_phases_avx2(const width_phase_rows *phases, int64_t, int64_t batch,
                                  int64_t channels, int64_t n_h, int64_t h, int64_t w, int64_t h0,
                                  int64_t sh, int64_t, float *out, int num_threads) {
    const width_phase_rows &even = phases[0].w0 == 0 ? phases[0] : phases[1],
                           &odd = phases[0].w0 == 0 ? phases[1] : phases[0];
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * channels; ++p)
        for (int64_t a = 0; a < n_h; ++a) {
            float *row = out + (p * h + h0 + a * sh) * w;
            const float *e = even.values + (p * n_h + a) * even.n_w,
                        *o = odd.values + (p * n_h + a) * odd.n_w;
            for (int64_t j = 0; 2 * j < w; j += 8) {
                const __m256 ev = avx2::load_first(e + j, even.n_w - j),
                             ov = avx2::load_first(o + j, odd.n_w - j);
                // e0 o0 e1 o1 | e4 o4 e5 o5 and e2 o2 e3 o3 | e6 o6 e7 o7
                const __m256 lo = _mm256_unpacklo_ps(ev, ov), hi = _mm256_unpackhi_ps(ev, ov);
                const int64_t left = w - 2 * j; // columns of this row from 2j on
                avx2::store_first(row + 2 * j, _mm256_permute2f128_ps(lo, hi, 0x20), left);
                if (left > 8)
                    avx2::store_first(row + 2 * j + 8, _mm256_permute2f128_ps(lo, hi, 0x31),
                                      left - 8);
            }
        }
}

// A channel's rows 32 bytes a step: the image bytes flipped to g + 128 and
// the lanes past them zeroed, stored whole into the rows after (written
// after it, by this thread: a channel per iteration) where the channel goes
// on; a load passing the tensor's end, or a store the channel's, goes
// through a buffer. Then the zeros to channel_bytes.
void pack_width_dy_u8_avx2(const int8_t *g, int64_t batch, int64_t channels, int64_t h, int64_t w,
                           int64_t row_bytes, int64_t channel_bytes, uint8_t *dst,
                           int num_threads) {
    const __m256i flip = _mm256_set1_epi8(-128), zero = _mm256_setzero_si256();
    const __m256i lane =
            _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                             20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
    const int8_t *g_end = g + batch * channels * h * w;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * channels; ++p) {
        uint8_t *plane = dst + p * channel_bytes;
        const int8_t *in = g + p * h * w;
        for (int64_t r = 0; r < h; ++r)
            for (int64_t x = 0; x < row_bytes; x += 32) {
                const int64_t n = std::max<int64_t>(0, std::min<int64_t>(32, w - x));
                const int8_t *from = in + r * w + x;
                __m256i v = zero;
                if (n == 32 || (n > 0 && from + 32 <= g_end)) {
                    v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(from));
                } else if (n > 0) {
                    alignas(32) int8_t bytes[32] = {};
                    std::memcpy(bytes, from, static_cast<size_t>(n));
                    v = _mm256_load_si256(reinterpret_cast<const __m256i *>(bytes));
                }
                // flipped where real (lane < n), zero past
                v = _mm256_and_si256(
                        _mm256_xor_si256(v, flip),
                        _mm256_cmpgt_epi8(_mm256_set1_epi8(static_cast<char>(n)), lane));
                avx2::store_first_bytes(plane + r * row_bytes + x, v,
                                        channel_bytes - r * row_bytes - x);
            }
        std::memset(plane + h * row_bytes, 0, static_cast<size_t>(channel_bytes - h * row_bytes));
    }
}

} // namespace qsp::detail

QSP_END_TARGET
