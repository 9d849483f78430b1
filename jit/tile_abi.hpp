// The tile ABI shared by the JIT generators, the per-layer plans and the
// layout passes: how batch-innermost tiles are laid out and what a kernel
// call receives. Changing anything here changes all three.
//
// A tiled tensor of `batch` rows and `channels` columns is
// ceil(batch / tile_batch) tiles; a tile holds `tile_batch` batch elements of
// every channel, contiguous per channel ("row" of the tile). Lanes past the
// batch are zero (the packing passes pad them), so kernels always work on
// whole vectors and the batch tail only changes how many vectors of a row a
// kernel touches (n_vec): no code is regenerated when the batch size changes.
//
//   f32 / int32 tiles  row = tile_batch 4-byte elements (tile_row_bytes)
//   int8 tiles         row = tile_batch bytes (s8_tile_row_bytes)
//   quad tiles (s8 SpMM source) row c holds, per batch element, the 4 bytes
//                      of channels 4c..4c+3 as u8 (value + 128): one dword
//                      per batch element, tile_row_bytes per row
// (The s8 SpMM without VNNI, jit::s8_word::entry_pair, reads int8
// tiles as they are, two rows per item: spmm_call_params' offsets are then
// two per item, its values one entry_pair_word per item.)
#pragma once

#include <cstdint>

namespace qsp::jit {

// An entry pair's weights w1, w2 (in [-127, 127]) as the kernel reads them:
// bytes |w1|, |w2|, w1, w2 (vpmaddubsw takes the magnitudes, vpsignb or the
// negating mask the signs; jit_spmm_entry.hpp).
constexpr uint32_t entry_pair_word(int w1, int w2) {
    return static_cast<uint32_t>(w1 < 0 ? -w1 : w1) | static_cast<uint32_t>(w2 < 0 ? -w2 : w2) << 8
           | static_cast<uint32_t>(static_cast<uint8_t>(w1)) << 16
           | static_cast<uint32_t>(static_cast<uint8_t>(w2)) << 24;
}

constexpr int tile_batch = 64;
constexpr int tile_row_bytes = tile_batch * 4;
constexpr int tile_row_shift = 8; // log2(tile_row_bytes)
constexpr int s8_tile_row_bytes = tile_batch;
constexpr int s8_tile_row_shift = 6;
static_assert(1 << tile_row_shift == tile_row_bytes, "tile_row_shift");
static_assert(1 << s8_tile_row_shift == s8_tile_row_bytes, "s8_tile_row_shift");

// Kernels loop over a 2-D grid of pixels (Conv2d output or input positions;
// Linear: one pixel). Pixel (ph, pw) moves the source by ph * src_h + pw *
// src_w bytes and the destination by ph * dst_h + pw * dst_w bytes.
struct pixel_grid {
    int64_t n_h = 1, n_w = 1; // >= 1 each
    int64_t src_h = 0, src_w = 0;
    int64_t dst_h = 0, dst_w = 0;
};

// SpMM (Linear): dst[r] = sum over entries e of row r of values[e] *
// src[offset of e] (tile rows: tile_batch lanes), for rows [row_begin,
// row_end); forward with the CSR of W, backward-data with its transpose.
// Source channels come in groups (spmm_plan.hpp, source_groups): the
// entries of row r in group g are [group_ptr[r * (n_groups + 1) + g],
// group_ptr[r * (n_groups + 1) + g + 1]); groups run outside rows, so a
// group's source rows stay in L1 while every row uses them, and a row's sums
// are stored after each group and reloaded by the next (s8: int32).
struct spmm_call_params {
    const void *values;         // per entry: f32 weight, or the s8 quad (entry pair) dword
    const int32_t *src_offsets; // per entry: byte offset of its source row (entry pairs: two)
    const int64_t *group_ptr;
    int64_t n_groups;
    int64_t row_begin, row_end;
    const void *src_tile;
    void *dst_tile;                          // f32, or int32 sums of (x + 128) * w for s8
    int64_t dst_row_stride = tile_row_bytes; // bytes from one destination row to the next
};

// SpMM in code specialised to one layer's pattern
// (jit_uni_spmm_pattern_kernel.hpp): the same sums as spmm_call_params for
// the rows of one part and one source group, the rows sorted by their
// number of entries in the group and taken in buckets of equal length, so
// that each bucket runs a body unrolled to exactly its length. Per
// scheduled row a record {first slot, first value, destination row's byte
// offset, 0}: the row's source offsets are src_offsets[slot...] (stored in
// schedule order), its values values[value...] (in the layer's order: the
// caller's weights need no copy). Per bucket: {length, rows}. Rows with no
// entry in a later group are not scheduled (their sums stay stored); in the
// first group they are, and get zeros.
struct spmm_schedule_call_params {
    const void *values;         // per entry: f32 weight, or the s8 quad dword
    const int32_t *src_offsets; // per slot: byte offset of its source row
    const int32_t *rows;        // spmm_schedule_record_ints per scheduled row
    const int32_t *buckets;     // 2 per bucket
    int64_t n_buckets;
    int64_t first_group; // 1: the sums start at zero; 0: from the stored partial sums
    const void *src_tile;
    void *dst_tile;
};
constexpr int spmm_schedule_record_ints = 4;
// The kernel reads the record of the row this many rows ahead (to prefetch
// its values and sums): the rows array holds as many readable records past
// its end.
constexpr int spmm_schedule_prefetch_rows = 8;

// SDDMM (backward-weights): diff_values[e] += dot(dy_tile[r, :], x_tile[c, :])
// for every entry e = (r, c) of rows [row_begin, row_end). Entries are
// processed in groups (16 on AVX-512, 8 on AVX2) and a group may read up to
// 16 offsets past the last entry: src_offsets must hold 16 readable extra
// entries.
// Scatter SpMM (Conv2d): the transposed walk. For every pixel, each source
// row is loaded once and multiplied into the destination rows of its entries
// (dst[row of e] += values[e] * src row); the pixel's destination rows are
// zeroed first. Source rows are few and reused by many entries, destination
// rows (one per output channel) stay in L1: one load of a source vector
// serves every output channel that uses it, instead of one load per entry.
struct spmm_scatter_call_params {
    const void *values;           // per entry: f32 weight, or the s8 quad dword
    const int32_t *entry_offsets; // per entry: byte offset of its destination row
    const int32_t *src_offsets;   // per source row: byte offset from the pixel's source base
    const int64_t *row_ptr;       // source row s owns entries [row_ptr[s], row_ptr[s + 1])
    int64_t n_src_rows;
    int64_t n_dst_rows, dst_row_stride; // the pixel's destination rows, zeroed first
    const void *src_tile;
    void *dst_tile;
    pixel_grid pix{};
};

// With pixels, each entry's dot product runs over every pixel of the grid
// too (src = x, dst = dy in its strides).
struct sddmm_call_params {
    const int32_t *src_offsets; // per entry: byte offset of its x row from the pixel's base
    const int64_t *row_ptr;
    int64_t row_begin, row_end;
    const void *x_tile;                     // f32, or s8 X
    const void *dy_tile;                    // f32, or u8 G + 128
    void *diff_values;                      // accumulated into (f32 or int32)
    int64_t dy_row_stride = tile_row_bytes; // bytes from one dY row to the next (s8: 64)
    pixel_grid pix{};
};
constexpr int sddmm_offset_padding = 16;

inline int64_t tile_count(int64_t batch) {
    return (batch + tile_batch - 1) / tile_batch;
}
inline int64_t tiled_elems(int64_t batch, int64_t channels) {
    return tile_count(batch) * channels * tile_batch;
}
// Vectors of `lanes` elements that tile t of a batch covers (the last tile
// may be partial).
inline int tile_vectors(int64_t batch, int64_t t, int lanes) {
    const int64_t rows = batch - t * tile_batch;
    return static_cast<int>(((rows < tile_batch ? rows : tile_batch) + lanes - 1) / lanes);
}

} // namespace qsp::jit
