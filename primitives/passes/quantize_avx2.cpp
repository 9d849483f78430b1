// The AVX2 tier of the s8 quantization passes (called only after CPU
// detection): the same float operations as the portable tier, 8 lanes at a
// time, so the integers agree bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "jit/tile_abi.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/simd_avx2.hpp"
#include "qsparseprop/quantization.hpp"

QSP_BEGIN_TARGET(QSP_ISA_AVX2)

namespace qsp::detail {

namespace avx2 {
namespace {

// The rows a pass walks, row r holding elements [r * cols, min(n, (r + 1) *
// cols)): of `channels` columns sharing a multiplier vector (inner == 1), of
// `inner` elements sharing one multiplier (inner > 1: Conv2d's planes of one
// channel), or blocks of 4096 without a multiplier. Threads take whole rows,
// so a row's multiplier is looked up once: per vector, `r % channels` was an
// integer division per 8 elements, most of the pass's time.
struct multiplier_rows {
    static constexpr int64_t block = 4096; // a multiple of 8: vectors start where they did
    int64_t n, rows, cols;
    multiplier_rows(int64_t n_, const float *mult, int64_t channels, int64_t inner)
        : n(n_), rows(!mult        ? (n_ + block - 1) / block
                      : inner == 1 ? n_ / channels
                                   : n_ / inner),
          cols(!mult        ? block
               : inner == 1 ? channels
                            : inner) {}
    int64_t row_len(int64_t r) const { return std::min(cols, n - r * cols); }
};

// Row r's elements from column c times their multipliers (the first `left`
// lanes): the row's own (`row_mult`, inner > 1) or the columns' (inner == 1).
inline __m256 times_multiplier(__m256 v, const float *mult, int64_t inner, __m256 row_mult,
                               int64_t c, int64_t left) {
    if (!mult) return v;
    return _mm256_mul_ps(v, inner > 1 ? row_mult : avx2::load_first(mult + c, left));
}
inline __m256 row_multiplier(const float *mult, int64_t channels, int64_t inner, int64_t r) {
    return mult && inner > 1 ? _mm256_set1_ps(mult[r % channels]) : _mm256_setzero_ps();
}

using maxima = stochastic_maxima;

// scaled: max |x[i] * mult[(i / inner) % channels]| (mult optional); plain
// (with_plain): max |x[i]|; each NaN if any of its values is NaN. One read
// of x for both.
template <bool with_plain>
maxima abs_maxima(const float *x, int64_t n, const float *mult, int64_t channels, int64_t inner,
                  int num_threads) {
    float scaled = 0.f, plain = 0.f;
    int nan_scaled = 0, nan_plain = 0;
    const multiplier_rows shape(n, mult, channels, inner);
#pragma omp parallel num_threads(num_threads) reduction(max                                        \
                                                        : scaled, plain)                           \
        reduction(|                                                                                \
                  : nan_scaled, nan_plain)
    {
        avx2::abs_max_lanes m, m_plain;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < shape.rows; ++r) {
            const int64_t len = shape.row_len(r);
            const __m256 row_mult = row_multiplier(mult, channels, inner, r);
            for (int64_t c = 0; c < len; c += 8) {
                const __m256 x_v = avx2::load_first(x + r * shape.cols + c, len - c);
                if (with_plain) m_plain.fold(x_v);
                m.fold(times_multiplier(x_v, mult, inner, row_mult, c, len - c));
            }
        }
        // a NaN goes to the flags: OpenMP's max reduction could drop it
        const float mine = m.value(), mine_plain = m_plain.value();
        nan_scaled |= std::isnan(mine);
        nan_plain |= std::isnan(mine_plain);
        if (!std::isnan(mine)) scaled = std::max(scaled, mine);
        if (!std::isnan(mine_plain)) plain = std::max(plain, mine_plain);
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return {nan_scaled ? nan : scaled, nan_plain ? nan : plain};
}

float abs_max(const float *x, int64_t n, const float *mult, int64_t channels, int64_t inner,
              int num_threads) {
    return abs_maxima<false>(x, n, mult, channels, inner, num_threads).scaled;
}

// The 8 int8 of 8 int32 in [-128, 127] (packed with saturation), in the low half.
inline __m128i int_bytes(__m256i i32) {
    const __m128i w16 =
            _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    return _mm_packs_epi16(w16, w16);
}

// The 8 int8 of integral floats clamped to +-127, in the low half.
inline __m128i q_bytes(__m256 v) {
    const __m256 lim = _mm256_set1_ps(static_cast<float>(quant_max));
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    return int_bytes(_mm256_cvttps_epi32(v));
}

// Stores the first n (<= 8) of the 8 bytes in b8's low half.
inline void store_bytes(int8_t *q, __m128i b8, int64_t n) {
    if (n >= 8) { // the common case: 8 bytes straight out (the copy below cost ~1 ns a byte)
        _mm_storel_epi64(reinterpret_cast<__m128i *>(q), b8);
        return;
    }
    alignas(16) int8_t bytes[16];
    _mm_store_si128(reinterpret_cast<__m128i *>(bytes), b8);
    std::copy(bytes, bytes + n, q);
}

// Clamps integral floats to +-127 and stores the first n (<= 8) as int8.
inline void store_q(int8_t *q, __m256 v, int64_t n) {
    store_bytes(q, q_bytes(v), n);
}

inline __m256i mix32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x7feb352du)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

} // namespace
} // namespace avx2

using avx2::abs_max;
using avx2::abs_maxima;
using avx2::maxima;
using avx2::mix32;
using avx2::multiplier_rows;
using avx2::row_multiplier;
using avx2::store_q;
using avx2::times_multiplier;

float quantize_rne_avx2(const float *x, int64_t n, int8_t *q, const float *known, int num_threads) {
    const quant_scale s =
            quant_scale_from_abs_max(known ? *known : abs_max(x, n, nullptr, 1, 1, num_threads));
    const __m256 inv = _mm256_set1_ps(s.inv);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; i += 8) {
        const int64_t left = n - i;
        if (!s.usable) {
            std::fill(q + i, q + i + std::min<int64_t>(left, 8), int8_t(0));
            continue;
        }
        const __m256 v = _mm256_mul_ps(avx2::load_first(x + i, left), inv);
        store_q(q + i, _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), left);
    }
    return s.scale;
}

namespace avx2 {
namespace {

// One stochastic quantization's per-vector step (quantization.hpp's
// stochastic_round of 8 lanes): v / scale clamped, then the fixed-point
// floor with the stream's half of each lane's hash.
struct stochastic_rounding {
    quant_scale s;
    __m256 inv;
    __m256i key; // the stream key without bit 0: what the hash mixes in
    uint32_t key32;
    stochastic_rounding(float abs_max, uint32_t seed32)
        : stochastic_rounding(quant_scale_from_abs_max(abs_max), seed32) {}
    stochastic_rounding(quant_scale scale, uint32_t seed32)
        : s(scale), inv(_mm256_set1_ps(s.inv)),
          key(_mm256_set1_epi32(static_cast<int>(seed32 & ~1u))), key32(seed32) {}
    // The flat indices i..i+7 (mod 2^32).
    static __m256i indices(int64_t i) {
        return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(i))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    __m256i hash(__m256i idx) const { return mix32(_mm256_xor_si256(idx, key)); }
    // Whether `other`'s noise is the other half of this stream's hash.
    bool shares_hash(const stochastic_rounding &other) const {
        return (key32 | 1u) == (other.key32 | 1u);
    }
    // sr(v / scale) in [-127, 127], the noise this stream's half of h.
    __m256i rounded(__m256 v, __m256i h) const {
        const __m256 lim = _mm256_set1_ps(static_cast<float>(quant_max));
        // max(t, -127) first: a NaN t becomes -127, as in stochastic_round
        const __m256 t = _mm256_min_ps(
                _mm256_max_ps(_mm256_mul_ps(v, inv), _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
        const __m256i fixed = _mm256_cvtps_epi32(_mm256_mul_ps(t, _mm256_set1_ps(65536.f)));
        const __m256i noise = (key32 & 1u) ? _mm256_srli_epi32(h, 16)
                                           : _mm256_and_si256(h, _mm256_set1_epi32(0xffff));
        return _mm256_srai_epi32(_mm256_add_epi32(fixed, noise), 16);
    }
    // The 8 int8 (low half) of elements hashed h; zeros when the scale is unusable.
    __m128i bytes_hashed(__m256 v, __m256i h) const {
        return s.usable ? int_bytes(rounded(v, h)) : _mm_setzero_si128();
    }
    // The same for elements i..i+7.
    __m128i bytes(__m256 v, int64_t i) const {
        return s.usable ? int_bytes(rounded(v, hash(indices(i)))) : _mm_setzero_si128();
    }
    void store(int8_t *q, __m256 v, int64_t i, int64_t left) const {
        store_bytes(q, bytes(v, i), left);
    }
};

// A pair's two roundings of elements i..i+7 (G2 of v, G1 of v_plain), the
// first `left`: one hash serves both where their streams share it.
inline void store_pair(const stochastic_rounding &scaled, int8_t *q, __m256 v,
                       const stochastic_rounding &plain, int8_t *q_plain, __m256 v_plain,
                       __m256i idx, int64_t left, bool shared) {
    const __m256i h = scaled.hash(idx);
    store_bytes(q, scaled.bytes_hashed(v, h), left);
    store_bytes(q_plain, plain.bytes_hashed(v_plain, shared ? h : plain.hash(idx)), left);
}

// q = quantize_stochastic(x * multiplier) and, with a plain rounding,
// q_plain = quantize_stochastic(x): one read of x for both.
void stochastic_pass(const float *x, int64_t n, const float *multiplier, int64_t channels,
                     int64_t inner, const stochastic_rounding &scaled, int8_t *q,
                     const stochastic_rounding *plain, int8_t *q_plain, int num_threads) {
    const multiplier_rows shape(n, multiplier, channels, inner);
    // Whole vectors of a usable rounding take a loop of their own: the
    // per-vector tail and usability tests, and the indices rebuilt from i,
    // were an eighth of the pass (128x24x28x28, 2 threads: 1.58 -> 1.38 ms;
    // the rest is mostly the hash's two 32-bit multiplies per vector, which
    // a pair's shared hash does once for both copies).
    const bool fast = scaled.s.usable && (!plain || plain->s.usable);
    const bool shared = plain && scaled.shares_hash(*plain);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < shape.rows; ++r) {
        const int64_t len = shape.row_len(r);
        const __m256 row_mult = row_multiplier(multiplier, channels, inner, r);
        int64_t c = 0;
        if (fast) {
            const int64_t first = r * shape.cols;
            __m256i idx = stochastic_rounding::indices(first);
            for (; c + 8 <= len; c += 8) {
                const __m256 x_v = _mm256_loadu_ps(x + first + c);
                const __m256 v =
                        multiplier ? times_multiplier(x_v, multiplier, inner, row_mult, c, 8) : x_v;
                const __m256i h = scaled.hash(idx);
                _mm_storel_epi64(reinterpret_cast<__m128i *>(q + first + c),
                                 int_bytes(scaled.rounded(v, h)));
                if (plain)
                    _mm_storel_epi64(reinterpret_cast<__m128i *>(q_plain + first + c),
                                     int_bytes(plain->rounded(x_v, shared ? h : plain->hash(idx))));
                idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
            }
        }
        for (; c < len; c += 8) {
            const int64_t i = r * shape.cols + c, left = len - c;
            const __m256 x_v = avx2::load_first(x + i, left);
            const __m256 v = times_multiplier(x_v, multiplier, inner, row_mult, c, left);
            if (plain)
                store_pair(scaled, q + i, v, *plain, q_plain + i, x_v,
                           stochastic_rounding::indices(i), left, shared);
            else
                scaled.store(q + i, v, i, left);
        }
    }
}

} // namespace
} // namespace avx2

using avx2::stochastic_pass;
using avx2::stochastic_rounding;
using avx2::store_pair;

void stochastic_pair_run_avx2(const float *x, int64_t n, uint64_t first, float mult,
                              const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain) {
    const stochastic_rounding scaled(r.scaled, r.seed32), plain(r.plain, r.plain_seed32);
    const bool shared = scaled.shares_hash(plain);
    const __m256 m = _mm256_set1_ps(mult);
    for (int64_t c = 0; c < n; c += 8) {
        const int64_t left = n - c, i = static_cast<int64_t>(first) + c;
        const __m256 x_v = avx2::load_first(x + c, left);
        store_pair(scaled, q + c, _mm256_mul_ps(x_v, m), plain, q_plain + c, x_v,
                   stochastic_rounding::indices(i), left, shared);
    }
}

float quantize_stochastic_avx2(const float *x, int64_t n, const float *multiplier, int64_t channels,
                               int64_t inner, uint32_t seed32, int8_t *q, int num_threads) {
    const stochastic_rounding scaled(abs_max(x, n, multiplier, channels, inner, num_threads),
                                     seed32);
    stochastic_pass(x, n, multiplier, channels, inner, scaled, q, nullptr, nullptr, num_threads);
    return scaled.s.scale;
}

float quantize_stochastic_plain_from_max_avx2(const float *x, int64_t n, uint32_t seed32,
                                              float abs_max, int8_t *q, int num_threads) {
    const stochastic_rounding plain(abs_max, seed32);
    stochastic_pass(x, n, nullptr, 1, 1, plain, q, nullptr, nullptr, num_threads);
    return plain.s.scale;
}

stochastic_scales quantize_stochastic_pair_avx2(const float *x, int64_t n, const float *multiplier,
                                                int64_t channels, int64_t inner, uint32_t seed32,
                                                int8_t *q, uint32_t plain_seed32, int8_t *q_plain,
                                                const stochastic_maxima *known, int num_threads) {
    const maxima m =
            known ? *known : abs_maxima<true>(x, n, multiplier, channels, inner, num_threads);
    const stochastic_rounding scaled(m.scaled, seed32), plain(m.plain, plain_seed32);
    stochastic_pass(x, n, multiplier, channels, inner, scaled, q, &plain, q_plain, num_threads);
    return {scaled.s.scale, plain.s.scale};
}

void quantize_weights_avx2(const int64_t *row_ptr, int64_t rows, const float *values, int8_t *q,
                           float *scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = row_ptr[r], e = row_ptr[r + 1];
        avx2::abs_max_lanes m;
        for (int64_t i = b; i < e; i += 8)
            m.fold(avx2::load_first(values + i, e - i));
        const quant_scale s = quant_scale_from_abs_max(m.value());
        const __m256 inv = _mm256_set1_ps(s.inv);
        for (int64_t i = b; i < e; i += 8) {
            if (!s.usable) {
                std::fill(q + i, q + std::min(i + 8, e), int8_t(0));
                continue;
            }
            const __m256 v = _mm256_mul_ps(avx2::load_first(values + i, e - i), inv);
            store_q(q + i, _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                    e - i);
        }
        scale[r] = s.scale;
    }
}

namespace {

// [batch x channels] -> byte tiles, 16 batch elements x 16 channels at a
// time: bytes(b, c0, cn) gives element b's channels c0..c0+cn-1 (b < batch;
// zero-padded to 16), transposed in registers and stored ^ flip, missing
// batch elements as 0 ^ flip.
template <typename bytes_t>
void to_byte_tiles(int64_t batch, int64_t channels, uint8_t *tiles, __m128i flip, int num_threads,
                   bytes_t bytes) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t tiles_n = jit::tile_count(batch), cblocks = (channels + 15) / 16;
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t cb = 0; cb < cblocks; ++cb) {
            const int64_t c0 = cb * 16, cn = std::min<int64_t>(16, channels - c0);
            for (int64_t j0 = 0; j0 < tb; j0 += 16) {
                __m128i r[16];
                for (int i = 0; i < 16; ++i) {
                    const int64_t b = t * tb + j0 + i;
                    r[i] = b < batch ? bytes(b, c0, cn) : _mm_setzero_si128();
                }
                avx2::transpose16_bytes(r);
                for (int64_t c = 0; c < cn; ++c)
                    _mm_storeu_si128(
                            reinterpret_cast<__m128i *>(tiles + (t * channels + c0 + c) * tb + j0),
                            _mm_xor_si128(r[c], flip));
            }
        }
}

// int8 [batch x channels] -> byte tiles, each byte ^ flip.
void bytes_to_tiles_avx2(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                         __m128i flip, int num_threads) {
    to_byte_tiles(batch, channels, tiles, flip, num_threads,
                  [&](int64_t b, int64_t c0, int64_t cn) {
                      const int8_t *in = x + b * channels + c0;
                      if (cn == 16) return _mm_loadu_si128(reinterpret_cast<const __m128i *>(in));
                      alignas(16) int8_t staged[16] = {};
                      std::copy(in, in + cn, staged);
                      return _mm_load_si128(reinterpret_cast<const __m128i *>(staged));
                  });
}

} // namespace

void pack_s8_tiles_avx2(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                        int32_t *column_sums, int num_threads) {
    bytes_to_tiles_avx2(x, batch, channels, reinterpret_cast<uint8_t *>(tiles), _mm_setzero_si128(),
                        num_threads);
    if (column_sums) column_sums_s8_avx2(x, batch, channels, column_sums, num_threads);
}

void column_sums_s8_avx2(const int8_t *x, int64_t batch, int64_t channels, int32_t *sums,
                         int num_threads) {
    // Blocks of 64 columns (a cache line a row) in int16 lanes for up to 256
    // rows at a time (|sum| <= 128 * 256 = 32768: -32768 fits, 127 * 256 =
    // 32512 fits), then widened into the int32 sums; the columns past the
    // last whole block as the portable tier adds them.
    constexpr int64_t cols = 64, rows_per_block = 256;
    const int64_t cblocks = channels / cols;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t cb = 0; cb <= cblocks; ++cb) {
        const int64_t c0 = cb * cols;
        if (cb == cblocks) { // the tail (maybe empty)
            for (int64_t c = c0; c < channels; ++c)
                sums[c] = 0;
            for (int64_t b = 0; b < batch; ++b)
                for (int64_t c = c0; c < channels; ++c)
                    sums[c] += x[b * channels + c];
            continue;
        }
        __m256i total[8];
        for (auto &v : total)
            v = _mm256_setzero_si256();
        for (int64_t b0 = 0; b0 < batch; b0 += rows_per_block) {
            __m256i part[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(),
                               _mm256_setzero_si256(), _mm256_setzero_si256()};
            const int64_t b1 = std::min(batch, b0 + rows_per_block);
            for (int64_t b = b0; b < b1; ++b)
                for (int i = 0; i < 4; ++i) {
                    const __m128i v = _mm_loadu_si128(
                            reinterpret_cast<const __m128i *>(x + b * channels + c0 + 16 * i));
                    part[i] = _mm256_add_epi16(part[i], _mm256_cvtepi8_epi16(v));
                }
            for (int i = 0; i < 4; ++i) {
                total[2 * i] = _mm256_add_epi32(
                        total[2 * i], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(part[i])));
                total[2 * i + 1] = _mm256_add_epi32(
                        total[2 * i + 1],
                        _mm256_cvtepi16_epi32(_mm256_extracti128_si256(part[i], 1)));
            }
        }
        for (int i = 0; i < 8; ++i) // total[i]: columns c0 + 8 i ...
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(sums + c0 + 8 * i), total[i]);
    }
}

void shift_to_s8_tiles_avx2(const int8_t *q, int64_t batch, int64_t channels, uint8_t *tiles,
                            int num_threads) {
    // x ^ 0x80 is x + 128 as u8
    bytes_to_tiles_avx2(q, batch, channels, tiles, _mm_set1_epi8(static_cast<char>(0x80)),
                        num_threads);
}

float quantize_stochastic_to_s8_tiles_avx2(const float *x, int64_t batch, int64_t channels,
                                           uint32_t seed32, uint8_t *tiles,
                                           const float *known_abs_max, int num_threads) {
    // Quantized straight into the transposes' registers: no int8 copy of dY
    // (it was a fresh batch x channels vector, zeroed and page-faulted in,
    // per call). Stored as G + 128 (u8); padding G = 0.
    const stochastic_rounding sr(known_abs_max
                                         ? *known_abs_max
                                         : abs_max(x, batch * channels, nullptr, 1, 1, num_threads),
                                 seed32);
    to_byte_tiles(batch, channels, tiles, _mm_set1_epi8(static_cast<char>(0x80)), num_threads,
                  [&](int64_t b, int64_t c0, int64_t cn) {
                      // in registers: bytes past cn are never stored (the
                      // transposes' rows c < cn are)
                      const int64_t at = b * channels + c0;
                      const __m128i lo = sr.bytes(avx2::load_first(x + at, cn), at);
                      const __m128i hi =
                              cn > 8 ? sr.bytes(avx2::load_first(x + at + 8, cn - 8), at + 8)
                                     : _mm_setzero_si128();
                      return _mm_unpacklo_epi64(lo, hi);
                  });
    return sr.s.scale;
}

void pack_quad_tiles_avx2(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                          int num_threads) {
    // A quad's 4 bytes are one dword: the tiles are the [batch x quads]
    // dword matrix transposed, 8 x 8 at a time, each byte + 128.
    const int64_t tb = jit::tile_batch, tiles_n = jit::tile_count(batch),
                  quads = (channels + 3) / 4, qblocks = (quads + 7) / 8;
    const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80808080u)); // s8 x -> u8 x + 128
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t qb = 0; qb < qblocks; ++qb) {
            const int64_t c0 = qb * 32, cn = std::min<int64_t>(32, channels - c0);
            const int64_t qn = std::min<int64_t>(8, quads - qb * 8);
            uint8_t *tile = tiles + t * quads * tb * 4;
            for (int64_t j0 = 0; j0 < tb; j0 += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; ++i) {
                    const int64_t b = t * tb + j0 + i;
                    const int8_t *row = x + b * channels + c0;
                    if (b >= batch) {
                        r[i] = _mm256_setzero_ps();
                    } else if (cn == 32) {
                        r[i] = _mm256_loadu_ps(reinterpret_cast<const float *>(row));
                    } else { // the last block of a row: its bytes, zeros after
                        alignas(32) int8_t staged[32] = {};
                        std::copy(row, row + cn, staged);
                        r[i] = _mm256_load_ps(reinterpret_cast<const float *>(staged));
                    }
                }
                avx2::transpose8(r); // 8 batch dwords (4 columns each) per quad
                for (int64_t q = 0; q < qn; ++q)
                    _mm256_storeu_si256(
                            reinterpret_cast<__m256i *>(tile + ((qb * 8 + q) * tb + j0) * 4),
                            _mm256_xor_si256(_mm256_castps_si256(r[q]), flip));
            }
        }
}

void unpack_s32_tiles_avx2(const int32_t *tiles, int64_t batch, int64_t channels,
                           const int32_t *correction, const float *scale, const float *bias,
                           float *dst, int num_threads, int64_t inner) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t tiles_n = jit::tile_count(batch), cblocks = (channels + 7) / 8;
    // Eight batch rows at a time, all their channel blocks in turn: each
    // thread writes whole rows of dst, front to back (by channel block
    // first, the rows' lines were filled in halves far apart: 256 x 3072
    // 0.21 -> 0.15 ms, 256 x 768 0.039 -> 0.019 ms, 2 threads).
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles_n; ++t)
        for (int64_t j0 = 0; j0 < tb; j0 += 8) {
            if (t * tb + j0 >= batch) continue;
            const int32_t *tile = tiles + t * channels * tb;
            for (int64_t cb = 0; cb < cblocks; ++cb) {
                const int64_t c0 = cb * 8, cn = std::min<int64_t>(8, channels - c0);
                // per lane: the channel's correction, scale and bias (Conv2d:
                // the output channel of a (channel, pixel) row); loaded straight
                // when each lane is its own channel (a division per lane, stored
                // lane by lane and reloaded as a vector, had been a third of
                // Linear L1's forward passes)
                __m256i corr;
                __m256 sc, bs = _mm256_setzero_ps();
                if (inner == 1) {
                    corr = cn == 8 ? _mm256_loadu_si256(
                                   reinterpret_cast<const __m256i *>(correction + c0))
                                   : _mm256_maskload_epi32(correction + c0, avx2::first_lanes(cn));
                    sc = avx2::load_first(scale + c0, cn);
                    if (bias) bs = avx2::load_first(bias + c0, cn);
                } else {
                    alignas(32) int32_t c8[8] = {};
                    alignas(32) float s8[8] = {}, b8[8] = {};
                    unpack_row_terms(correction, scale, bias, c0, cn, inner, c8, s8, b8);
                    corr = _mm256_load_si256(reinterpret_cast<const __m256i *>(c8));
                    sc = _mm256_load_ps(s8), bs = _mm256_load_ps(b8);
                }
                __m256 r[8];
                for (int i = 0; i < 8; ++i)
                    r[i] = i < cn ? _mm256_castsi256_ps(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i *>(tile + (c0 + i) * tb + j0)))
                                  : _mm256_setzero_ps();
                avx2::transpose8(r);
                for (int64_t i = 0; i < 8 && t * tb + j0 + i < batch; ++i) {
                    const __m256i exact = _mm256_sub_epi32(_mm256_castps_si256(r[i]), corr);
                    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), sc);
                    if (bias) y = _mm256_add_ps(y, bs);
                    avx2::store_first(dst + (t * tb + j0 + i) * channels + c0, y, cn);
                }
            }
        }
}

namespace avx2 {
namespace {

// Value i as the low byte of its lane: the dword gathered at max(i - 3, 0)
// ends at or past byte i and lies inside the values (at least 4), i sitting
// at byte i - max(i - 3, 0); i = -1 shifts by 2^32 - 8 bits, which leaves 0.
inline __m256i gather_values(const int8_t *wq, __m256i index) {
    const __m256i at =
            _mm256_max_epi32(_mm256_sub_epi32(index, _mm256_set1_epi32(3)), _mm256_setzero_si256());
    const __m256i dwords = _mm256_i32gather_epi32(reinterpret_cast<const int *>(wq), at, 1);
    const __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(index, at), 3);
    return _mm256_and_si256(_mm256_srlv_epi32(dwords, bits), _mm256_set1_epi32(0xff));
}

// Four items' words from their index pairs (first, second, first, ...):
// first | second << 8 in each qword's low dword, gathered into the low half.
inline __m128i four_pair_values(const int8_t *wq, const int32_t *index) {
    __m256i v = gather_values(wq, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(index)));
    v = _mm256_or_si256(v, _mm256_srli_epi64(v, 24));
    v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    return _mm256_castsi256_si128(v);
}

} // namespace
} // namespace avx2

void entry_pair_words_avx2(const int32_t *value_index, int64_t items, const int8_t *wq,
                           int64_t values, uint32_t *words, int num_threads) {
    if (values < 4) throw std::logic_error("entry_pair_words_avx2: fewer than 4 values");
    const int64_t blocks = items / 8;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int32_t *index = value_index + 16 * b;
        const __m256i pairs = _mm256_setr_m128i(avx2::four_pair_values(wq, index),
                                                avx2::four_pair_values(wq, index + 8));
        // bytes |w1|, |w2|, w1, w2 (bytes 2 and 3 of the pairs are 0)
        const __m256i w = _mm256_or_si256(_mm256_abs_epi8(pairs), _mm256_slli_epi32(pairs, 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(words + 8 * b), w);
    }
    for (int64_t i = blocks * 8; i < items; ++i) {
        const int32_t a = value_index[2 * i], b = value_index[2 * i + 1];
        words[i] = jit::entry_pair_word(wq[a], b < 0 ? 0 : wq[b]);
    }
}

namespace avx2 {
namespace {

// ---- the kept layout ----

void dequantize_kept(const int32_t *acc, int64_t batch, int64_t rows, const int32_t *correction,
                     const float *scale, const float *bias, float *dst, int num_threads) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t tiles = jit::tile_count(batch);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t)
        for (int64_t r = 0; r < rows; ++r) {
            const int32_t *a = acc + (t * rows + r) * tb;
            float *y = dst + (t * rows + r) * tb;
            const int64_t lanes = std::min(tb, batch - t * tb);
            const __m256i corr = _mm256_set1_epi32(correction ? correction[r] : 0);
            const __m256 sc = _mm256_set1_ps(scale[r]), bs = _mm256_set1_ps(bias ? bias[r] : 0.f);
            for (int64_t j = 0; j < tb; j += 8) {
                const __m256i exact = _mm256_sub_epi32(
                        _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a + j)), corr);
                __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), sc);
                if (bias) v = _mm256_add_ps(v, bs);
                if (j + 8 > lanes) // the padding: 0, bias or not
                    v = _mm256_and_ps(
                            v, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                       _mm256_set1_epi32(static_cast<int>(lanes - j)), lane)));
                _mm256_storeu_ps(y + j, v);
            }
        }
}

// a's rounding of x * multiplier[c] (optional) into tiles qa (^ flip_a),
// and b's (optional) of x into u8 tiles qb (^ 0x80: the SDDMM's G + 128):
// element (t, c, j) hashed at its plain index (t * 64 + j) * channels + c.
// Padding (x = 0) rounds to 0: the noise is below 2^16.
void stochastic_kept_pass(const float *x, int64_t batch, int64_t channels, const float *multiplier,
                          const stochastic_rounding &a, uint8_t *qa, uint8_t flip_a,
                          const stochastic_rounding *b, uint8_t *qb, int num_threads) {
    constexpr int64_t tb = jit::tile_batch;
    const int64_t tiles = jit::tile_count(batch);
    const bool shared = b && a.shares_hash(*b);
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80)),
                  flip_first = _mm_set1_epi8(static_cast<char>(flip_a));
    const __m256i step = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(8 * channels)));
    const __m256i lane_index = _mm256_mullo_epi32(
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(channels))));
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t)
        for (int64_t c = 0; c < channels; ++c) {
            const int64_t row = (t * channels + c) * tb;
            const __m256 mult = _mm256_set1_ps(multiplier ? multiplier[c] : 1.f);
            __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(
                                                   static_cast<uint32_t>(t * tb * channels + c))),
                                           lane_index);
            for (int64_t j = 0; j < tb; j += 8) {
                const __m256 x_v = _mm256_loadu_ps(x + row + j);
                const __m256 v = multiplier ? _mm256_mul_ps(x_v, mult) : x_v;
                const __m256i h = a.hash(idx);
                _mm_storel_epi64(reinterpret_cast<__m128i *>(qa + row + j),
                                 _mm_xor_si128(a.bytes_hashed(v, h), flip_first));
                if (b)
                    _mm_storel_epi64(
                            reinterpret_cast<__m128i *>(qb + row + j),
                            _mm_xor_si128(b->bytes_hashed(x_v, shared ? h : b->hash(idx)), flip));
                idx = _mm256_add_epi32(idx, step);
            }
        }
}

stochastic_scales stochastic_kept(const float *x, int64_t batch, int64_t channels,
                                  const float *multiplier, uint32_t seed32, int8_t *q,
                                  uint32_t plain_seed32, uint8_t *g1, int num_threads) {
    const int64_t n = jit::tiled_elems(batch, channels);
    // the kept tiles are (tiles, channels, 64): a multiplier per row of 64
    const maxima m =
            g1 ? abs_maxima<true>(x, n, multiplier, channels, jit::tile_batch, num_threads)
               : maxima{abs_max(x, n, multiplier, channels, jit::tile_batch, num_threads), 0.f};
    const stochastic_rounding scaled(m.scaled, seed32), plain(m.plain, plain_seed32);
    stochastic_kept_pass(x, batch, channels, multiplier, scaled, reinterpret_cast<uint8_t *>(q), 0,
                         g1 ? &plain : nullptr, g1, num_threads);
    return {scaled.s.scale, plain.s.scale};
}

float stochastic_g1_kept(const float *x, int64_t batch, int64_t channels, uint32_t seed32,
                         uint8_t *g1, int num_threads) {
    const stochastic_rounding plain(
            abs_max(x, jit::tiled_elems(batch, channels), nullptr, 1, 1, num_threads), seed32);
    stochastic_kept_pass(x, batch, channels, nullptr, plain, g1, 0x80, nullptr, nullptr,
                         num_threads);
    return plain.s.scale;
}

} // namespace
} // namespace avx2

const kept_s8_passes kept_s8_passes_avx2 = {avx2::dequantize_kept, avx2::stochastic_kept,
                                            avx2::stochastic_g1_kept};

} // namespace qsp::detail

QSP_END_TARGET
