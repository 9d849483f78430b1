// The f32 layout passes between torch's row-major tensors and the
// batch-innermost tiles of jit/tile_abi.hpp. At 90-98 % sparsity these
// passes, not the sparse kernels, are a large part of a step.
#pragma once

#include <cstdint>

#include "jit/tile_abi.hpp"

namespace qsp::detail {

using jit::tile_count;
using jit::tile_vectors;
using jit::tiled_elems;

// Lanes of tile t that kernels read (whole vectors of 16 covering the
// batch): the packing passes write these and no more.
inline int64_t tile_lanes(int64_t batch, int64_t t) {
    const int64_t rows = batch - t * jit::tile_batch;
    return rows >= jit::tile_batch ? jit::tile_batch : (rows + 15) / 16 * 16;
}

// src[batch x channels] -> tiles, at the best tier the effective ISA allows.
void pack_tiles(const float *src, int64_t batch, int64_t channels, float *tiles, int num_threads);
// tiles -> dst[batch x channels] (+ bias[channel / bias_inner] when given:
// Conv2d's channels are (output channel, pixel) pairs).
void unpack_tiles(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                  float *dst, int num_threads, int64_t bias_inner = 1);

// Zero padding around each (h x w) plane of a Conv2d tensor.
struct spatial_pad {
    int64_t top = 0, bottom = 0, left = 0, right = 0;
};

// The tiers (same results bit for bit; tested).
void pack_tiles_portable(const float *src, int64_t batch, int64_t channels, float *tiles,
                         int num_threads);
void unpack_tiles_portable(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                           float *dst, int num_threads, int64_t bias_inner = 1);
void pack_tiles_avx2(const float *src, int64_t batch, int64_t channels, float *tiles,
                     int num_threads);
void unpack_tiles_avx2(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                       float *dst, int num_threads, int64_t bias_inner = 1);
void pack_tiles_avx512(const float *src, int64_t batch, int64_t channels, float *tiles,
                       int num_threads);
void unpack_tiles_avx512(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                         float *dst, int num_threads, int64_t bias_inner = 1);

} // namespace qsp::detail
