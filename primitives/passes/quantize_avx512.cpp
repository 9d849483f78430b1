// The AVX-512 tier of the s8 passes (called only after CPU detection): the
// same float operations as the portable tier, 16 lanes at a time, so the
// integers agree.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include <omp.h>

#include "jit/tile_abi.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/simd_avx512.hpp"
#include "primitives/passes/stochastic_avx512.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "qsparseprop/quantization.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX512)

namespace qsp::detail {

namespace avx512 {
namespace {

inline __mmask16 first(int64_t n) {
    return first_lanes(n);
}

// The rows a pass walks: row r holds elements [r * cols, min(n, (r + 1) *
// cols)), `channels` columns sharing a multiplier vector (inner == 1:
// Linear's channels), `inner` elements sharing one multiplier (inner > 1:
// Conv2d's planes of one channel), or, without a multiplier, blocks of
// 4096. Threads take whole rows: a row's multiplier is read once, not found
// by an integer division per vector.
struct multiplier_rows {
    static constexpr int64_t block = 4096; // a multiple of 16
    int64_t n, rows, cols;
    const float *mult;
    int64_t channels;
    bool per_row;
    multiplier_rows(int64_t n_, const float *m, int64_t ch, int64_t inner)
        : n(n_), rows(!m           ? (n_ + block - 1) / block
                      : inner == 1 ? n_ / ch
                                   : n_ / inner),
          cols(!m           ? block
               : inner == 1 ? ch
                            : inner),
          mult(m), channels(ch), per_row(m && inner > 1) {}
    int64_t row_len(int64_t r) const { return std::min(cols, n - r * cols); }
    __m512 row_multiplier(int64_t r) const {
        return per_row ? _mm512_set1_ps(mult[r % channels]) : _mm512_setzero_ps();
    }
    // x_v (row r's elements from column c) times their multipliers.
    __m512 times(__m512 x_v, __m512 row_mult, int64_t c, __mmask16 k) const {
        if (!mult) return x_v;
        return _mm512_mul_ps(x_v, per_row ? row_mult : _mm512_maskz_loadu_ps(k, mult + c));
    }
};

using maxima = stochastic_maxima;

// scaled: max |x * mult| (mult optional); plain (with_plain): max |x|;
// each NaN if any of its values is. One read of x for both.
template <bool with_plain>
maxima abs_maxima(const float *x, const multiplier_rows &m, int num_threads) {
    float scaled = 0.f, plain = 0.f;
    int nan_scaled = 0, nan_plain = 0;
#pragma omp parallel num_threads(num_threads) reduction(max                                        \
                                                        : scaled, plain)                           \
        reduction(|                                                                                \
                  : nan_scaled, nan_plain)
    {
        __m512 m_scaled = _mm512_setzero_ps(), m_plain = m_scaled;
        __mmask16 bad_scaled = 0, bad_plain = 0;
        const __m512 sign = _mm512_set1_ps(-0.f);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m.rows; ++r) {
            const int64_t len = m.row_len(r);
            const __m512 row_mult = m.row_multiplier(r);
            for (int64_t c = 0; c < len; c += 16) {
                const __mmask16 k = first(len - c);
                const __m512 x_v = _mm512_maskz_loadu_ps(k, x + r * m.cols + c);
                if (with_plain) {
                    bad_plain |= _mm512_cmp_ps_mask(x_v, x_v, _CMP_UNORD_Q);
                    m_plain = _mm512_max_ps(m_plain, _mm512_andnot_ps(sign, x_v));
                }
                const __m512 v = m.times(x_v, row_mult, c, k);
                bad_scaled |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                m_scaled = _mm512_max_ps(m_scaled, _mm512_andnot_ps(sign, v));
            }
        }
        scaled = std::max(scaled, _mm512_reduce_max_ps(m_scaled));
        plain = std::max(plain, _mm512_reduce_max_ps(m_plain));
        nan_scaled |= bad_scaled != 0;
        nan_plain |= bad_plain != 0;
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return {nan_scaled ? nan : scaled, nan_plain ? nan : plain};
}

// Integral floats clamped to +-127, the lanes of k stored as int8 (the
// round-to-nearest passes; the stochastic rounding stores its own integers).
inline void store_q(int8_t *q, __m512 v, __mmask16 k) {
    const __m512 lim = _mm512_set1_ps(static_cast<float>(quant_max));
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
    _mm512_mask_cvtepi32_storeu_epi8(q, k, _mm512_cvttps_epi32(v)); // v is integral already
}

// max |v| with NaN propagation.
float abs_max(const float *x, const multiplier_rows &m, int num_threads) {
    return abs_maxima<false>(x, m, num_threads).scaled;
}

float abs_max(const float *x, int64_t n, int num_threads) {
    return abs_max(x, multiplier_rows(n, nullptr, 1, 1), num_threads);
}

} // namespace
} // namespace avx512

using avx512::abs_max;
using avx512::first;
using avx512::first_bytes;
using avx512::multiplier_rows;
using avx512::store_q;

float quantize_rne_avx512(const float *x, int64_t n, int8_t *q, const float *known,
                          int num_threads) {
    const quant_scale s = quant_scale_from_abs_max(known ? *known : abs_max(x, n, num_threads));
    const __m512 inv = _mm512_set1_ps(s.inv);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = first(n - i);
        if (!s.usable) {
            _mm512_mask_cvtepi32_storeu_epi8(q + i, k, _mm512_setzero_si512());
            continue;
        }
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv);
        store_q(q + i, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), k);
    }
    return s.scale;
}

namespace avx512 {
namespace {

// q = scaled's rounding of x * multiplier and, with `plain`, q_plain =
// plain's rounding of x: one read of x for both.
void stochastic_pass(const float *x, const multiplier_rows &m, const stochastic_rounding &scaled,
                     int8_t *q, const stochastic_rounding *plain, int8_t *q_plain,
                     int num_threads) {
    const bool shared = plain && scaled.shares_hash(*plain);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < m.rows; ++r) {
        const int64_t len = m.row_len(r), first_i = r * m.cols;
        const __m512 row_mult = m.row_multiplier(r);
        // flat indices mod 2^32, as the portable tier's uint32_t(i)
        __m512i idx = _mm512_add_epi32(
                _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_i))), lane);
        for (int64_t c = 0; c < len; c += 16) {
            const __mmask16 k = first(len - c);
            const __m512 x_v = _mm512_maskz_loadu_ps(k, x + first_i + c);
            const __m512 v = m.times(x_v, row_mult, c, k);
            if (plain)
                avx512::store_pair(scaled, q + first_i + c, v, *plain, q_plain + first_i + c, x_v,
                                   idx, k, shared);
            else
                scaled.store(q + first_i + c, v, idx, k);
            idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
    }
}

} // namespace
} // namespace avx512

float quantize_stochastic_avx512(const float *x, int64_t n, const float *multiplier,
                                 int64_t channels, int64_t inner, uint32_t seed32, int8_t *q,
                                 int num_threads) {
    const multiplier_rows m(n, multiplier, channels, inner);
    const avx512::stochastic_rounding sr(abs_max(x, m, num_threads), seed32);
    avx512::stochastic_pass(x, m, sr, q, nullptr, nullptr, num_threads);
    return sr.s.scale;
}

float quantize_stochastic_plain_from_max_avx512(const float *x, int64_t n, uint32_t seed32,
                                                float abs_max, int8_t *q, int num_threads) {
    const avx512::stochastic_rounding plain(abs_max, seed32);
    avx512::stochastic_pass(x, multiplier_rows(n, nullptr, 1, 1), plain, q, nullptr, nullptr,
                            num_threads);
    return plain.s.scale;
}

stochastic_scales quantize_stochastic_pair_avx512(const float *x, int64_t n,
                                                  const float *multiplier, int64_t channels,
                                                  int64_t inner, uint32_t seed32, int8_t *q,
                                                  uint32_t plain_seed32, int8_t *q_plain,
                                                  const stochastic_maxima *known, int num_threads) {
    const multiplier_rows m(n, multiplier, channels, inner);
    const avx512::maxima mx = known ? *known : avx512::abs_maxima<true>(x, m, num_threads);
    const avx512::stochastic_rounding scaled(mx.scaled, seed32), plain(mx.plain, plain_seed32);
    avx512::stochastic_pass(x, m, scaled, q, &plain, q_plain, num_threads);
    return {scaled.s.scale, plain.s.scale};
}

float quantize_stochastic_to_s8_tiles_avx512(const float *x, int64_t batch, int64_t channels,
                                             uint32_t seed32, uint8_t *tiles,
                                             const float *known_abs_max, int num_threads) {
    const int64_t n = batch * channels;
    const avx512::stochastic_rounding sr(
            known_abs_max ? *known_abs_max : abs_max(x, n, num_threads), seed32);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // element (b, c) has flat index b * channels + c: lanes of a transposed
    // vector are consecutive b, so their indices step by `channels`
    const __m512i lane_stride =
            _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(channels)));
    const __m512i shift = _mm512_set1_epi32(128);
    const int64_t tb = jit::tile_batch, tiles_n = jit::tile_count(batch),
                  cblocks = (channels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
            const __mmask16 cmask = first(cn);
            uint8_t *tile = tiles + t * channels * tb;
            for (int64_t j0 = 0; j0 < tb; j0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i) {
                    const int64_t b = t * tb + j0 + i;
                    r[i] = b < batch ? _mm512_maskz_loadu_ps(cmask, x + b * channels + c0)
                                     : _mm512_setzero_ps();
                }
                avx512::transpose16(r);
                const int64_t base = (t * tb + j0) * channels + c0;
                for (int64_t c = 0; c < cn; ++c) {
                    __m512i q = _mm512_setzero_si512(); // padding / unusable scale: G = 0
                    if (sr.s.usable) {
                        const __m512i idx =
                                _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(
                                                         static_cast<uint32_t>(base + c))),
                                                 lane_stride);
                        q = sr.rounded(r[c], sr.hash(idx));
                    }
                    _mm_storeu_si128(reinterpret_cast<__m128i *>(tile + (c0 + c) * tb + j0),
                                     _mm512_cvtepi32_epi8(_mm512_add_epi32(q, shift)));
                }
            }
        }
    return sr.s.scale;
}

namespace {

// int8 [batch x channels] -> byte tiles, each byte ^ flip; with
// column_sums, a thread takes a column block's every tile (its sums are
// that thread's alone).
void bytes_to_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                           __m128i flip, int32_t *column_sums, int num_threads) {
    const int64_t tb = jit::tile_batch, tiles_n = jit::tile_count(batch),
                  cblocks = (channels + 15) / 16;
    const __m512i flip64 = _mm512_broadcast_i32x4(flip);
    auto block = [&](int64_t t, int64_t cb) {
        const int64_t c0 = cb * 16;
        avx512::transpose_64x16_bytes(x + t * tb * channels + c0, channels, batch - t * tb,
                                      std::min<int64_t>(16, channels - c0),
                                      tiles + (t * channels + c0) * tb, tb, flip64,
                                      column_sums ? column_sums + c0 : nullptr);
    };
    if (column_sums) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            std::fill(column_sums + cb * 16, column_sums + std::min(channels, cb * 16 + 16), 0);
            for (int64_t t = 0; t < tiles_n; ++t)
                block(t, cb);
        }
        return;
    }
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb)
            block(t, cb);
}

} // namespace

void pack_s8_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                          int32_t *column_sums, int num_threads) {
    bytes_to_tiles_avx512(x, batch, channels, reinterpret_cast<uint8_t *>(tiles),
                          _mm_setzero_si128(), column_sums, num_threads);
}

void expand_quad_words_avx512(const quad_word_masks &m, const int8_t *values, uint32_t *words,
                              int32_t *correction, int num_threads) {
    auto *out = reinterpret_cast<uint8_t *>(words);
    const uint16_t *masks = m.masks; // locals: the stores below may alias m's fields
    const int64_t blocks = m.blocks, bytes_n = m.bytes;
    const int64_t groups = (blocks + quad_word_group - 1) / quad_word_group;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            int64_t at = m.group_entry[g];
            const int64_t end = std::min(blocks, (g + 1) * quad_word_group);
            for (int64_t block = g * quad_word_group; block < end; ++block) {
                const uint16_t k = masks[block];
                const int n = __builtin_popcount(k);
                const __m512i v = _mm512_cvtepi8_epi32(
                        _mm_maskz_loadu_epi8(avx512::first_lanes(n), values + at));
                const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_maskz_expand_epi32(k, v));
                const int64_t left = bytes_n - block * 16;
                if (left >= 16)
                    _mm_storeu_si128(reinterpret_cast<__m128i *>(out + block * 16), bytes);
                else
                    _mm_mask_storeu_epi8(out + block * 16, avx512::first_lanes(left), bytes);
                at += n;
            }
        }
        // Row sums: sad over the values + 128 (u8), less 128 per value.
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m.rows; ++r) {
            const int64_t a = m.entry_ptr[r], b = m.entry_ptr[r + 1];
            __m512i sum = _mm512_setzero_si512();
            for (int64_t l = a; l < b; l += 64) {
                const int64_t n = std::min<int64_t>(64, b - l);
                const __mmask64 k = first_bytes(n);
                const __m512i u = _mm512_maskz_mov_epi8(
                        k, _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, values + l), flip));
                sum = _mm512_add_epi64(sum, _mm512_sad_epu8(u, _mm512_setzero_si512()));
            }
            correction[r] =
                    static_cast<int32_t>(128 * (_mm512_reduce_add_epi64(sum) - 128 * (b - a)));
        }
    }
}

void column_sums_s8_avx512(const int8_t *x, int64_t batch, int64_t channels, int32_t *sums,
                           int num_threads) {
    // Blocks of 128 columns (two cache lines a row) in int16 lanes for up to
    // 256 rows at a time (|sum| <= 128 * 256 = 32768: -32768 fits, 127 * 256
    // = 32512 fits), then widened into the int32 sums.
    constexpr int64_t cols = 128, rows_per_block = 256;
    const int64_t cblocks = (channels + cols - 1) / cols;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t cb = 0; cb < cblocks; ++cb) {
        const int64_t c0 = cb * cols;
        __mmask64 mask[2];
        for (int h = 0; h < 2; ++h) {
            const int64_t n = std::clamp<int64_t>(channels - c0 - 64 * h, 0, 64);
            mask[h] = first_bytes(n);
        }
        __m512i total[8];
        for (auto &v : total)
            v = _mm512_setzero_si512();
        for (int64_t b0 = 0; b0 < batch; b0 += rows_per_block) {
            __m512i part[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(),
                               _mm512_setzero_si512(), _mm512_setzero_si512()};
            const int64_t b1 = std::min(batch, b0 + rows_per_block);
            for (int64_t b = b0; b < b1; ++b)
                for (int h = 0; h < 2; ++h) {
                    const __m512i v =
                            _mm512_maskz_loadu_epi8(mask[h], x + b * channels + c0 + 64 * h);
                    part[2 * h] = _mm512_add_epi16(part[2 * h],
                                                   _mm512_cvtepi8_epi16(_mm512_castsi512_si256(v)));
                    part[2 * h + 1] = _mm512_add_epi16(
                            part[2 * h + 1], _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(v, 1)));
                }
            for (int i = 0; i < 4; ++i) {
                total[2 * i] = _mm512_add_epi32(
                        total[2 * i], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(part[i])));
                total[2 * i + 1] = _mm512_add_epi32(
                        total[2 * i + 1],
                        _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(part[i], 1)));
            }
        }
        for (int i = 0; i < 8; ++i) // total[i]: columns c0 + 16 i ...
            _mm512_mask_storeu_epi32(
                    sums + c0 + 16 * i,
                    avx512::first_lanes(std::clamp<int64_t>(channels - c0 - 16 * i, 0, 16)),
                    total[i]);
    }
}

void shift_to_s8_tiles_avx512(const int8_t *q, int64_t batch, int64_t channels, uint8_t *tiles,
                              int num_threads) {
    // x ^ 0x80 is x + 128 as u8
    bytes_to_tiles_avx512(q, batch, channels, tiles, _mm_set1_epi8(static_cast<char>(0x80)),
                          nullptr, num_threads);
}

void pack_quad_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                            int num_threads) {
    const int64_t tb = jit::tile_batch, tiles_n = jit::tile_count(batch),
                  quads = (channels + 3) / 4;
    const int64_t qblocks = (quads + 15) / 16;
    const __m512i flip = _mm512_set1_epi32(static_cast<int>(0x80808080u)); // s8 x -> u8 x + 128
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t qb = 0; qb < qblocks; ++qb) {
            const int64_t c0 = qb * 64, cn = std::min<int64_t>(64, channels - c0);
            const __mmask64 cmask = first_bytes(cn);
            const int64_t qn = std::min<int64_t>(16, quads - qb * 16);
            uint8_t *tile = tiles + t * quads * tb * 4;
            for (int64_t j0 = 0; j0 < tb; j0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i) {
                    const int64_t b = t * tb + j0 + i;
                    r[i] = _mm512_castsi512_ps(
                            b < batch ? _mm512_maskz_loadu_epi8(cmask, x + b * channels + c0)
                                      : _mm512_setzero_si512());
                }
                avx512::transpose16(r); // 16 batch dwords (4 columns each) per quad
                for (int64_t q = 0; q < qn; ++q)
                    _mm512_storeu_si512(tile + ((qb * 16 + q) * tb + j0) * 4,
                                        _mm512_xor_si512(_mm512_castps_si512(r[q]), flip));
            }
        }
}

void unpack_s32_tiles_avx512(const int32_t *tiles, int64_t batch, int64_t channels,
                             const int32_t *correction, const float *scale, const float *bias,
                             float *dst, int num_threads, int64_t inner) {
    const int64_t tb = jit::tile_batch, tiles_n = jit::tile_count(batch),
                  cblocks = (channels + 15) / 16;
    // Sixteen batch rows at a time, all their channel blocks in turn: each
    // thread writes whole rows of dst, front to back (by channel block
    // first, 256 x 768 took twice as long; 256 x 3072 the same).
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t j0 = 0; j0 < tb; j0 += 16) {
            if (t * tb + j0 >= batch) continue;
            const int32_t *tile = tiles + t * channels * tb;
            for (int64_t cb = 0; cb < cblocks; ++cb) {
                const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
                const __mmask16 cmask = first(cn);
                __m512i corr;
                __m512 sc, bs = _mm512_setzero_ps();
                if (inner == 1) {
                    corr = _mm512_maskz_loadu_epi32(cmask, correction + c0);
                    sc = _mm512_maskz_loadu_ps(cmask, scale + c0);
                    if (bias) bs = _mm512_maskz_loadu_ps(cmask, bias + c0);
                } else { // one value per output channel: (channel, pixel) rows share it
                    alignas(64) int32_t c16[16] = {};
                    alignas(64) float s16[16] = {}, b16[16] = {};
                    unpack_row_terms(correction, scale, bias, c0, cn, inner, c16, s16, b16);
                    corr = _mm512_load_si512(c16);
                    sc = _mm512_load_ps(s16);
                    bs = _mm512_load_ps(b16);
                }
                __m512 r[16];
                for (int i = 0; i < 16; ++i)
                    r[i] = i < cn ? _mm512_castsi512_ps(
                                   _mm512_loadu_si512(tile + (c0 + i) * tb + j0))
                                  : _mm512_setzero_ps();
                avx512::transpose16(r);
                for (int64_t i = 0; i < 16 && t * tb + j0 + i < batch; ++i) {
                    const __m512i exact = _mm512_sub_epi32(_mm512_castps_si512(r[i]), corr);
                    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), sc);
                    if (bias) y = _mm512_add_ps(y, bs);
                    _mm512_mask_storeu_ps(dst + (t * tb + j0 + i) * channels + c0, cmask, y);
                }
            }
        }
}

void quantize_weights_avx512(const int64_t *row_ptr, int64_t rows, const float *values, int8_t *q,
                             float *scale, int num_threads) {
    const __m512 sign = _mm512_set1_ps(-0.f);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = row_ptr[r], e = row_ptr[r + 1];
        __m512 m = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int64_t i = b; i < e; i += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(first(e - i), values + i);
            bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, _mm512_andnot_ps(sign, v));
        }
        const quant_scale s = quant_scale_from_abs_max(bad ? std::numeric_limits<float>::quiet_NaN()
                                                           : _mm512_reduce_max_ps(m));
        const __m512 inv = _mm512_set1_ps(s.inv);
        for (int64_t i = b; i < e; i += 16) {
            const __mmask16 k = first(e - i);
            if (!s.usable) {
                _mm512_mask_cvtepi32_storeu_epi8(q + i, k, _mm512_setzero_si512());
                continue;
            }
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, values + i), inv);
            store_q(q + i, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                    k);
        }
        scale[r] = s.scale;
    }
}

} // namespace qsp::detail

QSP_END_TARGET
