// The layout passes of the output-width-innermost Conv2d kernels
// (jit/width_abi.hpp): NCHW tensors -> zero-padded planes whose rows are
// split into column phases (the horizontal stride) and long enough for every
// vector a kernel reads; and the inverse for outputs written per phase.
// Every element of a destination is written (padding, phase slack and the
// lanes past an image included): kernels read whole vectors of them.
#pragma once

#include <cstdint>

#include "primitives/passes/tile_layout.hpp"

namespace qsp::detail {

// One padded plane: `rows` rows of `phases` column phases, `phase_len`
// elements each; padded column c sits at phase c % phases, index c / phases.
struct width_plane {
    int64_t rows = 0, phases = 1, phase_len = 0;
    int64_t row_len() const { return phases * phase_len; }
    int64_t size() const { return rows * row_len(); }
    // Element offset of padded position (row, column).
    int64_t at(int64_t row, int64_t col) const {
        return row * row_len() + (col % phases) * phase_len + col / phases;
    }
};

// The passes with vector tiers: each signature once (a function type), the
// pass at the best tier the effective ISA allows and its tiers declared
// from it.

// f32 src[batch][channels][h][w] -> planes[batch][channels] (zeros around).
// Returns whether every value was finite (no NaN or Inf): the check costs
// nothing here, the values pass through registers anyway.
using pack_width_planes_fn = bool(const float *src, int64_t batch, int64_t channels, int64_t h,
                                  int64_t w, const spatial_pad &pad, const width_plane &plane,
                                  float *dst, int num_threads);
// int8 -> quad planes[batch][ceil(channels / 4)]: per position the 4 bytes
// of channels 4q..4q+3 as u8 (x + 128); 128 (x = 0) around and past the
// channels. The s8 SpMM source.
using pack_width_quads_fn = void(const int8_t *src, int64_t batch, int64_t channels, int64_t h,
                                 int64_t w, const spatial_pad &pad, const width_plane &plane,
                                 uint32_t *dst, int num_threads);

// int8 -> pair planes[batch][ceil(channels / 2)]: per position the u16
// (x + 128) of channels 2q, 2q+1; 128 (x = 0) around and past the channels.
// The s8 SpMM source on CPUs without VNNI.
using pack_width_pairs_fn = pack_width_quads_fn;

pack_width_planes_fn pack_width_planes;
pack_width_quads_fn pack_width_quads;
pack_width_pairs_fn pack_width_pairs;

// int8 -> int8 planes (0 around): x of the s8 SDDMM.
void pack_width_planes(const int8_t *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                       const spatial_pad &pad, const width_plane &plane, int8_t *dst,
                       int num_threads);
// int8 g[batch][channels][h][w] -> u8 rows of row_bytes >= w: g + 128, then
// zeros (the s8 SDDMM's dY: the zeros add nothing); a channel's rows are
// followed by zeros up to channel_bytes >= h * row_bytes.
using pack_width_dy_u8_fn = void(const int8_t *g, int64_t batch, int64_t channels, int64_t h,
                                 int64_t w, int64_t row_bytes, int64_t channel_bytes, uint8_t *dst,
                                 int num_threads);
pack_width_dy_u8_fn pack_width_dy_u8;
// Backward-data of a horizontal stride: the column phases of one row phase,
// each values[b][c][a][j] for a < n_h, j < n_w (rows n_w long) holding
// out[b][c][h0 + a * sh][w0 + j * sw]. The phases' columns tile the rows
// (every column is one phase's): each row of out is written once, whole
// (a pass per phase wrote every row sw times, its lines read back each time).
struct width_phase_rows {
    const float *values;
    int64_t w0, n_w;
};
using interleave_width_phases_fn = void(const width_phase_rows *phases, int64_t count,
                                        int64_t batch, int64_t channels, int64_t n_h, int64_t h,
                                        int64_t w, int64_t h0, int64_t sh, int64_t sw, float *out,
                                        int num_threads);
interleave_width_phases_fn interleave_width_phases;

// The flat SpMM's output (an image's output rows side by side at the
// source's padded width, as one kernel row): out[p][a][j] =
// flat[p * plane_stride + a * row_len + j] for planes p, rows a < n_h and
// columns j < n_w (the lanes past n_w in each row are the padding's: dropped).
using unflatten_width_rows_fn = void(const float *flat, int64_t planes, int64_t n_h, int64_t n_w,
                                     int64_t row_len, int64_t plane_stride, float *out,
                                     int num_threads);
unflatten_width_rows_fn unflatten_width_rows;

// The tiers (the same values bit for bit; tested).
namespace portable {
pack_width_planes_fn pack_width_planes;
pack_width_quads_fn pack_width_quads;
pack_width_pairs_fn pack_width_pairs;
pack_width_dy_u8_fn pack_width_dy_u8;
interleave_width_phases_fn interleave_width_phases;
unflatten_width_rows_fn unflatten_width_rows;
} // namespace portable
// Planes without column phases only.
pack_width_planes_fn pack_width_planes_avx512;
// Planes without column phases or with two.
pack_width_planes_fn pack_width_planes_avx2;
// Planes without column phases or with two.
pack_width_quads_fn pack_width_quads_avx512;
// Planes without column phases or with two.
pack_width_pairs_fn pack_width_pairs_avx2;
// A horizontal stride of 2: two phases, columns 0 and 1 (in either order).
interleave_width_phases_fn interleave_width_phases_avx512;
interleave_width_phases_fn interleave_width_phases_avx2;
pack_width_dy_u8_fn pack_width_dy_u8_avx512;
pack_width_dy_u8_fn pack_width_dy_u8_avx2;
unflatten_width_rows_fn unflatten_width_rows_avx512;

} // namespace qsp::detail
