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

// src[batch x channels] -> tiles, at the best tier the effective ISA allows.
void pack_tiles(const float *src, int64_t batch, int64_t channels, float *tiles, int num_threads);
// tiles -> dst[batch x channels] (+ bias[channel] when given).
void unpack_tiles(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                  float *dst, int num_threads);

// The tiers (same results bit for bit; tested).
void pack_tiles_portable(const float *src, int64_t batch, int64_t channels, float *tiles,
                         int num_threads);
void unpack_tiles_portable(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                           float *dst, int num_threads);
void pack_tiles_avx2(const float *src, int64_t batch, int64_t channels, float *tiles,
                     int num_threads);
void unpack_tiles_avx2(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                       float *dst, int num_threads);
void pack_tiles_avx512(const float *src, int64_t batch, int64_t channels, float *tiles,
                       int num_threads);
void unpack_tiles_avx512(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                         float *dst, int num_threads);

} // namespace qsp::detail
