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

// Each pass's signature once (a function type); the pass at the best tier
// the effective ISA allows and its tiers are declared from it.

// src[batch x channels] -> tiles.
using pack_tiles_fn = void(const float *src, int64_t batch, int64_t channels, float *tiles,
                           int num_threads);
// tiles -> dst[batch x channels] (+ bias[channel / bias_inner] when given:
// Linear's bias_inner is 1, Conv2d's channels are (output channel, pixel)
// pairs).
using unpack_tiles_fn = void(const float *tiles, int64_t batch, int64_t channels, const float *bias,
                             float *dst, int num_threads, int64_t bias_inner);

pack_tiles_fn pack_tiles;
unpack_tiles_fn unpack_tiles;

// The kept layout (qsp::kept_layout_desc) is the tiles with every lane
// beyond the batch zero, as oneDNN keeps a blocked format's padding; the
// packing passes write only the lanes kernels read. Lanes [batch % 64, 64)
// of the last tile's rows <- 0, after bias[channel] (when given) is added to
// the lanes of the batch: what a kernel's tiles need to become kept.
void finish_kept_tiles(float *tiles, int64_t batch, int64_t channels, const float *bias,
                       int num_threads);
// src[batch x channels] -> the kept layout (pack_tiles, then the padding).
void pack_kept(const float *src, int64_t batch, int64_t channels, float *tiles, int num_threads);

// Zero padding around each (h x w) plane of a Conv2d tensor.
struct spatial_pad {
    int64_t top = 0, bottom = 0, left = 0, right = 0;
};

// The tiers (same results bit for bit; tested).
namespace portable {
pack_tiles_fn pack_tiles;
unpack_tiles_fn unpack_tiles;
} // namespace portable
pack_tiles_fn pack_tiles_avx2;
unpack_tiles_fn unpack_tiles_avx2;
pack_tiles_fn pack_tiles_avx512;
unpack_tiles_fn unpack_tiles_avx512;

} // namespace qsp::detail
