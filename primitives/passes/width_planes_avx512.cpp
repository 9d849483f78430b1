// The AVX-512 tier of the width plane packs (called only after CPU
// detection), for planes without column phases (the s8 quads also with
// two, a horizontal stride of 2): a row is its left padding,
// the image row moved 16 values per masked load / store, and its right
// padding, with no call per row (rows are short: the portable loop's
// per-row overhead, not memory, bounded it). Also backward-data's stride-2
// zip of two column phases into rows, and the s8 SDDMM's u8 dY rows.
#include <immintrin.h>

#include <algorithm>

#include "primitives/passes/simd_avx512.hpp"
#include "primitives/passes/width_planes.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail {

namespace {

using avx512::first_bytes;
using avx512::first_lanes;

// row[from, to) = value, 16 lanes a store.
inline void fill_lanes(uint32_t *row, int64_t from, int64_t to, __m512i value) {
    for (int64_t j = from; j < to; j += 16)
        _mm512_mask_storeu_epi32(row + j, first_lanes(to - j), value);
}

} // namespace

bool pack_width_planes_avx512(const float *src, int64_t batch, int64_t channels, int64_t h,
                              int64_t w, const spatial_pad &pad, const width_plane &plane,
                              float *dst, int num_threads) {
    const int64_t planes = batch * channels, row_len = plane.row_len();
    const __m512i zero = _mm512_setzero_si512();
    int bad = 0;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static) reduction(| : bad)
    for (int64_t p = 0; p < planes; ++p)
        for (int64_t r = 0; r < plane.rows; ++r) {
            auto *row = reinterpret_cast<uint32_t *>(dst + p * plane.size() + r * row_len);
            const int64_t y = r - pad.top;
            if (y < 0 || y >= h) {
                fill_lanes(row, 0, row_len, zero);
                continue;
            }
            const float *in = src + (p * h + y) * w;
            fill_lanes(row, 0, pad.left, zero);
            __mmask16 nonfinite = 0;
            for (int64_t x = 0; x < w; x += 16) {
                const __mmask16 m = first_lanes(w - x);
                const __m512 v = _mm512_maskz_loadu_ps(m, in + x);
                nonfinite |= _mm512_mask_fpclass_ps_mask(m, v, 0x99); // NaN, +Inf, -Inf
                _mm512_mask_storeu_ps(reinterpret_cast<float *>(row) + pad.left + x, m, v);
            }
            bad |= nonfinite != 0;
            fill_lanes(row, pad.left + w, row_len, zero);
        }
    return !bad;
}

void pack_width_quads_avx512(const int8_t *src, int64_t batch, int64_t channels, int64_t h,
                             int64_t w, const spatial_pad &pad, const width_plane &plane,
                             uint32_t *dst, int num_threads) {
    const int64_t quads = (channels + 3) / 4, row_len = plane.row_len();
    const __m512i zero = _mm512_set1_epi32(static_cast<int>(0x80808080u)); // x = 0 as u8
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * quads; ++p)
        for (int64_t r = 0; r < plane.rows; ++r) {
            uint32_t *row = dst + p * plane.size() + r * row_len;
            const int64_t y = r - pad.top;
            if (y < 0 || y >= h) {
                fill_lanes(row, 0, row_len, zero);
                continue;
            }
            const int64_t b = p / quads, q = p % quads;
            if (plane.phases == 2) // the row whole, then its columns over it (in L1)
                fill_lanes(row, 0, row_len, zero);
            else
                fill_lanes(row, 0, pad.left, zero);
            for (int64_t x = 0; x < w; x += 16) {
                const __mmask16 m = first_lanes(w - x);
                __m128i ch[4];
                for (int k = 0; k < 4; ++k) {
                    const int64_t c = 4 * q + k;
                    ch[k] = c < channels ? _mm_maskz_loadu_epi8(
                                    m, src + ((b * channels + c) * h + y) * w + x)
                                         : _mm_setzero_si128();
                }
                // 16 dwords, one per column: the bytes of channels 4q..4q+3
                const __m128i lo01 = _mm_unpacklo_epi8(ch[0], ch[1]),
                              hi01 = _mm_unpackhi_epi8(ch[0], ch[1]),
                              lo23 = _mm_unpacklo_epi8(ch[2], ch[3]),
                              hi23 = _mm_unpackhi_epi8(ch[2], ch[3]);
                __m512i v = _mm512_castsi128_si512(_mm_unpacklo_epi16(lo01, lo23));
                v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(lo01, lo23), 1);
                v = _mm512_inserti32x4(v, _mm_unpacklo_epi16(hi01, hi23), 2);
                v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(hi01, hi23), 3);
                v = _mm512_xor_si512(v, zero);
                if (plane.phases == 1) {
                    _mm512_mask_storeu_epi32(row + pad.left + x, m, v);
                    continue;
                }
                // stride 2: padded column c = left + x + k goes to phase c % 2,
                // index c / 2; x is even, so the even k share a phase (lanes 0-7
                // after the permute), the odd k the other (lanes 8-15)
                const __m512i split = _mm512_permutexvar_epi32(
                        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15), v);
                const int64_t c0 = pad.left + x, n = std::min<int64_t>(16, w - x);
                uint32_t *even = row + (c0 % 2) * plane.phase_len + c0 / 2,
                         *odd = row + ((c0 + 1) % 2) * plane.phase_len + (c0 + 1) / 2;
                _mm512_mask_storeu_epi32(even, first_lanes((n + 1) / 2), split);
                _mm256_mask_storeu_epi32(odd, static_cast<__mmask8>(first_lanes(n / 2)),
                                         _mm512_extracti64x4_epi64(split, 1));
            }
            if (plane.phases == 1) fill_lanes(row, pad.left + w, row_len, zero);
        }
}

// Stride 2: row[2j + w0] = phase[j], the even and the odd columns zipped
// 16 + 16 values at a time into two vectors (the portable loop stored one
// float per instruction, 8 bytes apart).
void interleave_width_phases_avx512(const width_phase_rows *phases, int64_t, int64_t batch,
                                    int64_t channels, int64_t n_h, int64_t h, int64_t w, int64_t h0,
                                    int64_t sh, int64_t, float *out, int num_threads) {
    const width_phase_rows &even = phases[0].w0 == 0 ? phases[0] : phases[1],
                           &odd = phases[0].w0 == 0 ? phases[1] : phases[0];
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                  high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15,
                                           31);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * channels; ++p)
        for (int64_t a = 0; a < n_h; ++a) {
            float *row = out + (p * h + h0 + a * sh) * w;
            const float *e = even.values + (p * n_h + a) * even.n_w,
                        *o = odd.values + (p * n_h + a) * odd.n_w;
            for (int64_t j = 0; 2 * j < w; j += 16) {
                const __m512 ev = _mm512_maskz_loadu_ps(first_lanes(even.n_w - j), e + j),
                             ov = _mm512_maskz_loadu_ps(first_lanes(odd.n_w - j), o + j);
                const int64_t left = w - 2 * j; // columns of this row from 2j on
                _mm512_mask_storeu_ps(row + 2 * j, first_lanes(left),
                                      _mm512_permutex2var_ps(ev, low, ov));
                if (left > 16)
                    _mm512_mask_storeu_ps(row + 2 * j + 16, first_lanes(left - 16),
                                          _mm512_permutex2var_ps(ev, high, ov));
            }
        }
}

// A channel's rows 64 bytes a step: the image bytes flipped to g + 128 and
// zeros past them in one masked load and xor, stored whole into the rows
// after (written after it, by this thread: a channel per iteration) up to
// the channel's end, then the zeros to channel_bytes.
void pack_width_dy_u8_avx512(const int8_t *g, int64_t batch, int64_t channels, int64_t h, int64_t w,
                             int64_t row_bytes, int64_t channel_bytes, uint8_t *dst,
                             int num_threads) {
    const __m512i flip = _mm512_set1_epi8(-128);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * channels; ++p) {
        uint8_t *plane = dst + p * channel_bytes;
        const int8_t *in = g + p * h * w;
        for (int64_t r = 0; r < h; ++r)
            for (int64_t x = 0; x < row_bytes; x += 64) {
                const __mmask64 real = first_bytes(w - x);
                const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(real, in + r * w + x),
                                                   _mm512_maskz_mov_epi8(real, flip));
                _mm512_mask_storeu_epi8(plane + r * row_bytes + x,
                                        first_bytes(channel_bytes - r * row_bytes - x), v);
            }
        for (int64_t x = h * row_bytes; x < channel_bytes; x += 64)
            _mm512_mask_storeu_epi8(plane + x, first_bytes(channel_bytes - x),
                                    _mm512_setzero_si512());
    }
}

void unflatten_width_rows_avx512(const float *flat, int64_t planes, int64_t n_h, int64_t n_w,
                                 int64_t row_len, int64_t plane_stride, float *out,
                                 int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < planes; ++p) {
        const float *in = flat + p * plane_stride;
        float *o = out + p * n_h * n_w;
        for (int64_t a = 0; a < n_h; ++a, in += row_len, o += n_w)
            for (int64_t j = 0; j < n_w; j += 16) {
                const __mmask16 m = first_lanes(n_w - j);
                _mm512_mask_storeu_ps(o + j, m, _mm512_maskz_loadu_ps(m, in + j));
            }
    }
}

} // namespace qsp::detail

QSP_END_TARGET
