// The ABI of the output-width-innermost ("width") kernels, shared by their
// generators, the Conv2d width plans and the layout passes. Vector lanes run
// along one row of an image (16 output columns per zmm, 8 per ymm); images
// stay in planes (NCHW), so a large image needs no transposes and its
// channels are whole contiguous rows.
//
// Sources are zero-padded planes whose rows are long enough for every vector
// a kernel reads (the lanes past the image read the padding's zeros, never
// unwritten memory): a weight is one broadcast and one multiply-add per
// vector of an output row, and the source of an output row moves by a fixed
// step per row, the kernel's own (sparse_kernel_params::row_step). A
// horizontal stride is taken out of the lanes by splitting each padded row
// into `stride` column phases (column c at phase c % s, index c / s), so
// lanes are always consecutive in memory.
//
//   f32 source          one float per position
//   s8 SpMM source      quads: one dword per position holding the u8 bytes
//                       (value + 128) of 4 consecutive channels, one plane
//                       per 4 channels; or pairs (without VNNI,
//                       s8_word::pair): the u16 (value + 128) of 2
//                       consecutive channels, one plane per 2 channels
//   s8 SDDMM            x: one s8 byte per position; dY: u8 (g + 128) rows
//                       whose bytes past the output width are 0 (they add
//                       nothing); a dword lane sums 4 consecutive columns
#pragma once

#include <cstdint>

namespace qsp::jit {

// Width SpMM (Conv2d forward, and backward-data per stride phase): for every
// output row a in [0, n_out_rows) and channel r in [row_begin, row_end),
// dst[r][a][lane] = epilogue(sum over entries e of channel r of values[e] *
// src[src_offsets[e] + a * row_step + lane]), written for the real lanes
// only (the last vector is masked to the kernel's tail).
//   f32: epilogue(s) = s + bias[r]
//   s8:  epilogue(s) = float(s - correction[r]) * scale[r] + bias[r], where s
//        sums the u8 x s8 quad dot products
// One channel's statistics of one call (an image's rows of one chunk), per
// vector lane: the values v the call stored, shifted by the first of them
// (lane 0 of the first vector: the sums of v - shift lose nothing to
// cancellation), summed, and their range. Lanes past the chunk's width
// keep 0, 0, +inf, -inf.
struct width_statistics {
    float shift, unused[15];
    float sum[16];     // of v - shift
    float squares[16]; // of (v - shift)^2
    float lowest[16], highest[16];
};

struct spmm_width_call_params {
    const void *values;         // per entry: f32 weight, or the s8 quad dword
    const int32_t *src_offsets; // per entry: byte offset from the source base of output row 0
    // Entries of channel r whose source channel is in group g:
    // [group_ptr[r * (n_groups + 1) + g], group_ptr[r * (n_groups + 1) + g + 1]).
    // Groups run outermost (after the block of rows), so that the source rows
    // of one group stay in L1 while every channel uses them; a channel's sums
    // are stored after each group and reloaded by the next (s8: as int32
    // bits in dst, until the last group's epilogue).
    // Aligned sources (the kernel's shifts S > 0): the source, its rows and
    // its offsets sit on vector boundaries (64 or 32 bytes), and each
    // group's entries come in S runs, run s reading lanes from s past the
    // entry's offset: [group_ptr[r * (n_groups * S + 1) + g * S + s], the
    // next). A row's lanes then never cross a cache line in a load.
    const int64_t *group_ptr;
    int64_t n_groups;
    int64_t row_begin, row_end;
    const void *src; // moving the kernel's row_step bytes per output row
    int64_t n_out_rows;
    float *dst; // row a of channel r: dst + r * dst_channel_stride + a * dst_row_stride bytes
    int64_t dst_channel_stride, dst_row_stride; // bytes
    const float *bias;         // per channel, always given (zeros when the layer has none)
    const int32_t *correction; // s8: per channel
    const float *scale;        // s8: per channel
    // Nonzero when row a + 1 of a channel starts where row a ends (one call
    // writes whole rows, back to back) and a tail vector's lanes past its row
    // are no more than a row: a row's tail vector may then be loaded and
    // stored whole, those lanes landing in the next row, which the same block
    // stores after it.
    int64_t dst_rows_back_to_back;
    // Null, or where the AVX-512 kernels accumulate the batch statistics of
    // the values they store, channel by channel (the batch_statistics
    // post-op taken in the epilogue; avx2 kernels ignore it): channel r's
    // width_statistics at statistics + r * statistics_channel_stride bytes,
    // written whole by the call (its first block starts it).
    width_statistics *statistics;
    int64_t statistics_channel_stride; // bytes
};

// Width SDDMM (Conv2d backward-weights): for every entry e of rows
// [row_begin, row_end), partial[e] (one vector of lane sums, f32 or int32) +=
// sum over output rows a of dy[r][a][lane] * x[x_offsets[e] + a * row_step +
// lane] (the kernel's row_step). f32 dY rows are read as they are (the tail
// lanes masked to zero); s8 dY rows are padded with zero bytes. An output
// row may be a whole image (at stride 1, s8 always and f32 on narrow rows:
// its rows at the padded width, dY's zero past each row), the row step then
// an image's. So may the SpMM's (narrow rows at stride 1: the lanes past
// each row are then the caller's to drop).
struct sddmm_width_call_params {
    const int32_t *x_offsets; // per entry: byte offset from the x base of output row 0
    const int64_t *group_ptr; // as in spmm_width_call_params (runs too, f32)
    int64_t n_groups;
    int64_t row_begin, row_end;
    const void *x;
    const void *dy;
    int64_t dy_channel_stride, dy_row_stride; // bytes
    int64_t n_out_rows;
    void *partial; // entry e's vector at partial + e * vector bytes
};

} // namespace qsp::jit
