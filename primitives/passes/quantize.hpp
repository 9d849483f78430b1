// The s8 quantization passes (the rules of include/qsparseprop/quantization.hpp)
// and the s8 tile passes of the JIT kernels. Every tier computes the same
// integers bit for bit (the same float operations in the same order, just
// more lanes at a time): the portable tier is the statement, the AVX2 and
// AVX-512 tiers are tested against it.
#pragma once

#include <cstdint>

#include "primitives/passes/tile_layout.hpp"
#include "qsparseprop/formats.hpp"
#include "qsparseprop/quantization.hpp"

namespace qsp::detail {

// Each pass's signature is stated once, as a function type; the pass (at the
// best tier the effective ISA allows, quantize.cpp's tables) and its tiers
// are declared from it.

// Per-tensor round-half-even; returns the scale (0 for an all-zero tensor,
// NaN when x holds NaN/Inf). With `known` (max |x| as the writer of x
// found it), the pass finding the maximum is skipped.
using quantize_rne_fn = float(const float *x, int64_t n, int8_t *q, const float *known,
                              int num_threads);
// Stochastic rounding of v[i] = x[i] * (multiplier ? multiplier[(i / inner) %
// channels] : 1) with noise stochastic_rounding_noise(seed32, i); returns
// the scale.
using quantize_stochastic_fn = float(const float *x, int64_t n, const float *multiplier,
                                     int64_t channels, int64_t inner, uint32_t seed32, int8_t *q,
                                     int num_threads);
// The s8 backward's two roundings of dY (core/s8_protocol.hpp) in one pass
// over x: q = quantize_stochastic(x, multiplier, seed32) and q_plain =
// quantize_stochastic(x, no multiplier, plain_seed32), the same integers and
// scales as the two calls; the two maxima share a read of x, the two
// roundings another (four reads become two), and where the seeds differ in
// bit 0 only (a training step's two streams) one hash per element gives
// both noises (quantization.hpp).
// With `known` (the two maxima, max |x * multiplier| and max |x|, as the
// producer of x found them while writing it), the first read is skipped.
struct stochastic_scales {
    float scaled, plain;
};
struct stochastic_maxima {
    float scaled, plain;
};
using quantize_stochastic_pair_fn = stochastic_scales(const float *x, int64_t n,
                                                      const float *multiplier, int64_t channels,
                                                      int64_t inner, uint32_t seed32, int8_t *q,
                                                      uint32_t plain_seed32, int8_t *q_plain,
                                                      const stochastic_maxima *known,
                                                      int num_threads);
// One run of the pair's two roundings, for an x its writer computes in
// pieces rather than stores (a fused BatchNorm's dY, made run by run into a
// buffer): x holds the n values of flat indices first..first+n-1 (the
// noise's indices, mod 2^32), all of one multiplier `mult`; q[i] and
// q_plain[i] are the integers quantize_stochastic_pair writes at those
// indices, given the pair's scales (from its maxima) and seeds.
struct stochastic_pair_rounding {
    quant_scale scaled, plain;
    uint32_t seed32, plain_seed32;
};
using stochastic_pair_run_fn = void(const float *x, int64_t n, uint64_t first, float mult,
                                    const stochastic_pair_rounding &r, int8_t *q, int8_t *q_plain);
// The best tier the effective ISA allows (asked once per pass, called per
// run; AVX-512 rounds the BatchNorm's dY in its own loop,
// quantize_pair_from_gradient_avx512).
stochastic_pair_run_fn *stochastic_pair_run_tier();
// The pair's two maxima from max |x| per channel (channel_abs_max[c], NaN
// where the channel holds a NaN; a channel as the multiplier's, (i / inner)
// % channels): the same floats the pair's maxima read finds, since
// |x * m| = |x| * |m| rounds monotonically in |x| — except where a
// multiplier is infinite (0 * inf is NaN for one element, not for the
// channel's maximum): then nothing (false).
bool pair_maxima_from_channels(const float *channel_abs_max, const float *multiplier,
                               int64_t channels, stochastic_maxima &out);
// Per-row (output channel) symmetric weights: scale[r] = max |row r| / 127.
using quantize_weights_fn = void(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                                 int num_threads);
// Backward-weights operand of the s8 SDDMM, in the int8 tile layout:
// G1 = sr(dY / sg1) stored as G1 + 128 (u8; padding 128, i.e. G = 0), the
// same integers as quantize_stochastic with no multiplier; returns sg1.
// known_abs_max (or null): max |x| given (a caller that knows it, from its
// writer's channel maxima), so x is read once.
using quantize_stochastic_to_s8_tiles_fn = float(const float *x, int64_t batch, int64_t channels,
                                                 uint32_t seed32, uint8_t *tiles,
                                                 const float *known_abs_max, int num_threads);
// int8 [batch x channels] -> int8 tiles (padding 0); with column_sums (or
// null), also column_sums_s8 of x, taken while the bytes are in registers
// (the s8 SDDMM's +128 correction: x read once, not twice).
using pack_s8_tiles_fn = void(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                              int32_t *column_sums, int num_threads);
// int8 G1 [batch x channels] -> the u8 tiles quantize_stochastic_to_s8_tiles
// writes (G1 + 128, padding 128): the fused backward's G1, already rounded
// in backward-data's pass over dY, read as bytes instead of dY as floats.
using shift_to_s8_tiles_fn = void(const int8_t *q, int64_t batch, int64_t channels, uint8_t *tiles,
                                  int num_threads);
// int8 [batch x channels] -> quad tiles of the s8 SpMM (jit/tile_abi.hpp).
using pack_quad_tiles_fn = void(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                                int num_threads);
// int32 tiles -> dst[b, c] = float(tile - correction[k]) * scale[k] (+ bias[k]),
// k = c / inner (Linear: inner 1; Conv2d: the output channel of a (channel,
// pixel) row).
using unpack_s32_tiles_fn = void(const int32_t *tiles, int64_t batch, int64_t channels,
                                 const int32_t *correction, const float *scale, const float *bias,
                                 float *dst, int num_threads, int64_t inner);
// The terms of rows c0 .. c0 + n - 1 of an unpack, k = c / inner, into
// lanes 0 .. n - 1 (the vector tiers' per-lane arrays; bias 0 without one):
// counted along the rows, not divided per lane.
inline void unpack_row_terms(const int32_t *correction, const float *scale, const float *bias,
                             int64_t c0, int64_t n, int64_t inner, int32_t *c_out, float *s_out,
                             float *b_out) {
    int64_t k = c0 / inner, left = inner - c0 % inner;
    for (int64_t i = 0; i < n; ++i) {
        c_out[i] = correction[k];
        s_out[i] = scale[k];
        b_out[i] = bias ? bias[k] : 0.f;
        if (--left == 0) ++k, left = inner;
    }
}
// quantize_stochastic with no multiplier and max |x| given (`abs_max`, as
// found: NaN where x holds one), x read once; returns the scale.
using quantize_stochastic_plain_from_max_fn = float(const float *x, int64_t n, uint32_t seed32,
                                                    float abs_max, int8_t *q, int num_threads);
// sums[c] = sum_b x[b, c] (the +128 correction of the s8 SDDMM).
using column_sums_s8_fn = void(const int8_t *x, int64_t batch, int64_t channels, int32_t *sums,
                               int num_threads);

// The quad words of an s8 SpMM plan (4 channels a word) from this step's
// weights, the bytes the plan's own loop makes (tested): the words' bytes,
// 16 per mask, take the entries' values in entry order at the bytes each
// mask marks, 0 elsewhere (an entry's byte is after the one before it);
// correction[r] = 128 * the sum of row r's values. values[l] is entry l's
// weight: the quantized weights themselves where the plan takes them in
// order, else a gathered copy.
struct quad_word_masks {
    const uint16_t *masks = nullptr;      // per 16 bytes of the words
    int64_t blocks = 0;                   // masks
    int64_t bytes = 0;                    // the words' bytes (4 per quad)
    const int64_t *group_entry = nullptr; // per quad_word_group masks: its first entry
    const int64_t *entry_ptr = nullptr;   // per row its first entry, then the end
    int64_t rows = 0;
};
constexpr int64_t quad_word_group = 64; // masks (1 KiB of words) a thread takes at a time
using expand_quad_words_fn = void(const quad_word_masks &m, const int8_t *values, uint32_t *words,
                                  int32_t *correction, int num_threads);
// The vector tier the effective ISA allows, or null (the plan's own loop,
// which reads each entry's slot, then fills the words).
expand_quad_words_fn *expand_quad_words_tier();

// Entry pairs' words (jit::entry_pair_word) from a step's quantized
// weights: item i takes values wq[value_index[2i]] and wq[value_index[2i+1]]
// (-1: none, a zero weight). `values` (>= 4) bounds wq: each value is read
// as a byte of a dword that lies inside wq.
using entry_pair_words_fn = void(const int32_t *value_index, int64_t items, const int8_t *wq,
                                 int64_t values, uint32_t *words, int num_threads);
// The vector tier the effective ISA allows, or null (the plan's own loop).
entry_pair_words_fn *entry_pair_words_tier();

// s8 Linear in the kept layout (kept_layout_desc: tiles [tiles][channels][64]
// of f32, padding zero). Entry pairs read s8 tiles, which are that order at
// a byte an element, so quantize_rne over the kept tiles makes the
// forward's; these make the rest with the plain layout's integers: each
// element's rounding hashed at its plain index b * channels + c.
struct kept_s8_passes {
    // dst = float(acc - correction[r]) * scale[r] (+ bias[r]) over int32
    // tiles [tiles][rows][64], unpack_s32_tiles' float operations, padding
    // lanes 0; dst may be acc's memory.
    void (*dequantize)(const int32_t *acc, int64_t batch, int64_t rows, const int32_t *correction,
                       const float *scale, const float *bias, float *dst, int num_threads);
    // quantize_stochastic(x * multiplier[c], seed32) into s8 tiles q and,
    // with g1 (plain_seed32), quantize_stochastic(x) as the SDDMM's u8 tiles
    // (G1 + 128, padding 128); returns (sg2, sg1) as quantize_stochastic_pair.
    stochastic_scales (*stochastic)(const float *x, int64_t batch, int64_t channels,
                                    const float *multiplier, uint32_t seed32, int8_t *q,
                                    uint32_t plain_seed32, uint8_t *g1, int num_threads);
    // quantize_stochastic(x, seed32) alone as the SDDMM's u8 tiles; sg1.
    float (*stochastic_g1)(const float *x, int64_t batch, int64_t channels, uint32_t seed32,
                           uint8_t *g1, int num_threads);
};
// The tier the effective ISA allows (AVX2 and up), or null.
const kept_s8_passes *kept_s8_passes_tier();

quantize_rne_fn quantize_rne;
quantize_stochastic_fn quantize_stochastic;
quantize_stochastic_pair_fn quantize_stochastic_pair;
quantize_stochastic_plain_from_max_fn quantize_stochastic_plain_from_max;
quantize_weights_fn quantize_weights;
quantize_stochastic_to_s8_tiles_fn quantize_stochastic_to_s8_tiles;
pack_s8_tiles_fn pack_s8_tiles;
shift_to_s8_tiles_fn shift_to_s8_tiles;
pack_quad_tiles_fn pack_quad_tiles;
unpack_s32_tiles_fn unpack_s32_tiles;
column_sums_s8_fn column_sums_s8;

// ---- the tiers ------------------------------------------------------------------

namespace portable {
quantize_rne_fn quantize_rne;
quantize_stochastic_fn quantize_stochastic;
quantize_stochastic_pair_fn quantize_stochastic_pair; // the two calls, by definition
stochastic_pair_run_fn stochastic_pair_run;
// quantize_stochastic's rounding with the maximum given (its first read skipped).
float quantize_stochastic_from_max(const float *x, int64_t n, const float *multiplier,
                                   int64_t channels, int64_t inner, uint32_t seed32, float abs_max,
                                   int8_t *q, int num_threads);
quantize_stochastic_plain_from_max_fn quantize_stochastic_plain_from_max;
quantize_weights_fn quantize_weights;
quantize_stochastic_to_s8_tiles_fn quantize_stochastic_to_s8_tiles;
pack_s8_tiles_fn pack_s8_tiles;
pack_quad_tiles_fn pack_quad_tiles;
unpack_s32_tiles_fn unpack_s32_tiles;
column_sums_s8_fn column_sums_s8;
float abs_max(const float *x, int64_t n);
shift_to_s8_tiles_fn shift_to_s8_tiles;
} // namespace portable

quantize_rne_fn quantize_rne_avx2;
quantize_stochastic_fn quantize_stochastic_avx2;
quantize_stochastic_pair_fn quantize_stochastic_pair_avx2;
quantize_stochastic_plain_from_max_fn quantize_stochastic_plain_from_max_avx2;
stochastic_pair_run_fn stochastic_pair_run_avx2;
// Quantized straight into tiles, 16 x 16 values at a time.
quantize_stochastic_to_s8_tiles_fn quantize_stochastic_to_s8_tiles_avx2;
unpack_s32_tiles_fn unpack_s32_tiles_avx2;
pack_s8_tiles_fn pack_s8_tiles_avx2;
pack_quad_tiles_fn pack_quad_tiles_avx2;
shift_to_s8_tiles_fn shift_to_s8_tiles_avx2;
column_sums_s8_fn column_sums_s8_avx2;
// Two dword gathers per 8 items (the byte at its place in each).
entry_pair_words_fn entry_pair_words_avx2;
extern const kept_s8_passes kept_s8_passes_avx2;
// Reads the rows only, like quantize_weights_avx512.
void quantize_weights_avx2(const int64_t *row_ptr, int64_t rows, const float *values, int8_t *q,
                           float *scale, int num_threads);

quantize_rne_fn quantize_rne_avx512;
quantize_stochastic_fn quantize_stochastic_avx512;
quantize_stochastic_pair_fn quantize_stochastic_pair_avx512;
quantize_stochastic_plain_from_max_fn quantize_stochastic_plain_from_max_avx512;
quantize_stochastic_to_s8_tiles_fn quantize_stochastic_to_s8_tiles_avx512;
pack_s8_tiles_fn pack_s8_tiles_avx512;
shift_to_s8_tiles_fn shift_to_s8_tiles_avx512;
pack_quad_tiles_fn pack_quad_tiles_avx512;
unpack_s32_tiles_fn unpack_s32_tiles_avx512;
column_sums_s8_fn column_sums_s8_avx512;
// vpexpandd: each mask's 16 bytes from the next popcount(mask) values.
expand_quad_words_fn expand_quad_words_avx512;
// Reads the rows only (not the column indices): a form of its own.
void quantize_weights_avx512(const int64_t *row_ptr, int64_t rows, const float *values, int8_t *q,
                             float *scale, int num_threads);

} // namespace qsp::detail
