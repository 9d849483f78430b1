// The layout passes of Conv2d: torch's NCHW tensors <-> pixel-major
// batch-innermost tiles (jit/tile_abi.hpp rows of 64 batch lanes), row
// (pixel, channel) = (h * width + w) * channels + c.
//
// Pixel-major keeps the rows of one pixel contiguous. Channel-major rows
// (c * h * w + pixel) put the same pixel of consecutive channels h * w * 256
// bytes apart, and with power-of-two planes (14 x 14 padded to 16 x 16, say)
// all of them fall into one cache set: the kernels then thrashed L1 and L2
// (measured: C3 f32 forward 20 ms channel-major).
#pragma once

#include <cstdint>

#include "primitives/passes/tile_layout.hpp"

namespace qsp::detail {

// Each pass's signature once (a function type); the pass at the best tier
// the effective ISA allows and its tiers are declared from it.

// f32 src[batch][channels][h][w] -> tiles of rows (padded pixel, channel),
// zero padding.
using pack_conv_tiles_fn = void(const float *src, int64_t batch, int64_t channels, int64_t h,
                                int64_t w, const spatial_pad &pad, float *tiles, int num_threads);
// f32 tiles of rows (pixel, channel), pixels = h * w (no padding) ->
// dst[batch][channels][pixels] (+ bias[channel]).
using unpack_conv_tiles_fn = void(const float *tiles, int64_t batch, int64_t channels,
                                  int64_t pixels, const float *bias, float *dst, int num_threads);
// int8 x -> quad tiles of rows (padded pixel, channel / 4): per batch lane
// the 4 bytes of channels 4q..4q+3 as u8 (x + 128); 128 (x = 0) in the
// padding and past the channels.
using pack_conv_quad_tiles_fn = void(const int8_t *x, int64_t batch, int64_t channels, int64_t h,
                                     int64_t w, const spatial_pad &pad, uint8_t *tiles,
                                     int num_threads);
// int8 x -> pair tiles of rows (padded pixel, channel / 2): per batch lane
// the u16 (x + 128) of channels 2q, 2q+1; 128 (x = 0) in the padding and
// past the channels. The s8 scatter's source without VNNI (vpmaddwd).
using pack_conv_pair_tiles_fn = pack_conv_quad_tiles_fn;
// int8 x -> int8 tiles of rows (padded pixel, channel), 0 in the padding,
// all 64 lanes written (the s8 SDDMM reads whole rows); with plane_sums
// (channels * h * w, or null), also column_sums_s8 of x as [batch x
// channels * h * w] (the batch's sum of each element), taken while each
// byte is in a register (the s8 backward-weights' +128 correction needs them).
using pack_conv_s8_tiles_fn = void(const int8_t *x, int64_t batch, int64_t channels, int64_t h,
                                   int64_t w, const spatial_pad &pad, int8_t *tiles,
                                   int32_t *plane_sums, int num_threads);
// int32 tiles of rows (pixel, channel) -> dst[b][c][p] =
// float(acc - correction[(c * pixels + p) / correction_inner]) *
// scale[(c * pixels + p) / scale_inner] (+ bias[c]).
using unpack_conv_s32_tiles_fn = void(const int32_t *tiles, int64_t batch, int64_t channels,
                                      int64_t pixels, const int32_t *correction,
                                      int64_t correction_inner, const float *scale,
                                      int64_t scale_inner, const float *bias, float *dst,
                                      int num_threads);

pack_conv_tiles_fn pack_conv_tiles;
unpack_conv_tiles_fn unpack_conv_tiles;
pack_conv_quad_tiles_fn pack_conv_quad_tiles;
pack_conv_pair_tiles_fn pack_conv_pair_tiles;
pack_conv_s8_tiles_fn pack_conv_s8_tiles;
unpack_conv_s32_tiles_fn unpack_conv_s32_tiles;

// The tiers (the same values bit for bit; tested).
namespace portable {
pack_conv_tiles_fn pack_conv_tiles;
unpack_conv_tiles_fn unpack_conv_tiles;
pack_conv_quad_tiles_fn pack_conv_quad_tiles;
pack_conv_pair_tiles_fn pack_conv_pair_tiles;
pack_conv_s8_tiles_fn pack_conv_s8_tiles;
unpack_conv_s32_tiles_fn unpack_conv_s32_tiles;
} // namespace portable

pack_conv_tiles_fn pack_conv_tiles_avx512;
unpack_conv_tiles_fn unpack_conv_tiles_avx512;
pack_conv_quad_tiles_fn pack_conv_quad_tiles_avx512;
pack_conv_pair_tiles_fn pack_conv_pair_tiles_avx512;
pack_conv_s8_tiles_fn pack_conv_s8_tiles_avx512;
pack_conv_s8_tiles_fn pack_conv_s8_tiles_avx2;
pack_conv_tiles_fn pack_conv_tiles_avx2;
unpack_conv_tiles_fn unpack_conv_tiles_avx2;
unpack_conv_s32_tiles_fn unpack_conv_s32_tiles_avx512;

} // namespace qsp::detail
