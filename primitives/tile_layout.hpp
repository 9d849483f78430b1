// The batch-innermost tile layout of the JIT kernels and the passes that
// convert to and from torch's row-major layout. A tiled tensor of `batch`
// rows and `channels` columns is ceil(batch / 64) tiles of channels x 64
// floats; lanes past the batch are zero.
#pragma once

#include <cstdint>

#include "jit/jit_avx512_spmm.hpp"

namespace qsp::detail {

inline int64_t tile_count(int64_t batch) {
    return (batch + jit::tile_batch - 1) / jit::tile_batch;
}
inline int64_t tiled_elems(int64_t batch, int64_t channels) {
    return tile_count(batch) * channels * jit::tile_batch;
}
// Vectors of `lanes` in tile t (the last tile may be partial).
inline int tile_vectors(int64_t batch, int64_t t, int lanes = 16) {
    const int64_t rows = batch - t * jit::tile_batch;
    return static_cast<int>(((rows < jit::tile_batch ? rows : jit::tile_batch) + lanes - 1)
                            / lanes);
}

// src[batch x channels] -> tiles. Uses AVX-512 when the effective ISA allows.
void pack_tiles(const float *src, int64_t batch, int64_t channels, float *tiles, int num_threads);
// tiles -> dst[batch x channels] (+ bias[channel] when given).
void unpack_tiles(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                  float *dst, int num_threads);

// The AVX-512 versions (tile_layout_avx512.cpp) and the portable ones.
void pack_tiles_avx512(const float *src, int64_t batch, int64_t channels, float *tiles,
                       int num_threads);
void unpack_tiles_avx512(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                         float *dst, int num_threads);
void pack_tiles_avx2(const float *src, int64_t batch, int64_t channels, float *tiles,
                     int num_threads);
void unpack_tiles_avx2(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                       float *dst, int num_threads);
void pack_tiles_portable(const float *src, int64_t batch, int64_t channels, float *tiles,
                         int num_threads);
void unpack_tiles_portable(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                           float *dst, int num_threads);

} // namespace qsp::detail
