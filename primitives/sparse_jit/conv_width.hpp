// Conv2d on the output-width-innermost kernels (jit/width_abi.hpp): tensors
// stay NCHW planes, vector lanes run along an output row, so large images
// (early layers, small batches) need no transposes into batch tiles.
//
//   forward           x padded into planes (passes/width_planes.hpp), rows of
//                     y are sums over each output channel's entries of the
//                     weight times the x row of its tap, read at (ic,
//                     oh * sh + kh * dh, ow * sw + kw * dw): the horizontal
//                     stride is a column phase of the planes, so lanes are
//                     consecutive
//   backward-data     the same per stride phase of the input (as in
//                     conv_layout): in a phase every tap (oc, kh, kw) reads a
//                     whole row of padded dY, and dX rows of the phase are
//                     written in place (a horizontal stride goes through a
//                     phase buffer)
//   backward-weights  per entry, its x window times the dY rows of its
//                     output channel, summed into one vector of lanes
//
// Entries of a row are keyed ((c / 4) * taps + tap) * 4 + c % 4 for channel
// c and tap (kh, kw): 4 consecutive channels of one tap share key / 4, so
// the s8 plans form their quads from the same rows.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "primitives/core/problem.hpp"
#include "primitives/passes/width_planes.hpp"
#include "primitives/sparse_jit/conv_layout.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"

namespace qsp::detail {

// How the kernels cover an output row of `width` lanes: calls of at most
// `chunk` vectors side by side, `rows` output rows per step, the last
// vector of the row masked to `tail` lanes (0: whole).
struct width_split {
    int64_t width = 0, lanes = 16, vectors = 0, chunk = 0;
    int64_t chunks() const { return (vectors + chunk - 1) / chunk; }
    int64_t first_lane(int64_t c) const { return c * chunk * lanes; }
    int chunk_vectors(int64_t c) const;
    int tail(int64_t c) const; // lanes of chunk c's last vector that are real (0: all)
    int64_t read_lanes() const { return vectors * lanes; }
};
// max_vectors: what the kernel can hold of one output row.
width_split split_width(int64_t width, int64_t lanes, int max_vectors);

struct conv_width {
    conv_layout l;
    int64_t taps;

    explicit conv_width(const conv2d_shape &s) : l(s), taps(l.kh * l.kw) {}

    static int64_t key(int64_t channel, int64_t tap, int64_t taps) {
        return ((channel / 4) * taps + tap) * 4 + channel % 4;
    }
    int64_t key_channel(int64_t key) const { return key / 4 / taps * 4 + key % 4; }
    int64_t key_quad(int64_t key) const { return key / 4 / taps; }
    int64_t key_tap(int64_t key) const { return key / 4 % taps; }

    // Forward / backward-weights source: padded x planes whose rows hold
    // `read_lanes` lanes past every tap's start, `align` lanes long a whole
    // number of times (aligned sources: every row starts on a vector).
    width_plane x_plane(int64_t read_lanes, int64_t align = 1) const;
    // The same when an image is one output row (stride 1: backward-weights
    // in s8, the SpMM and the f32 backward-weights on narrow rows; see
    // jit_conv2d_width.cpp's flat_spmm_split): rows at the padded width,
    // and zero rows past the image for the farthest tap's read of the last
    // vector.
    width_plane flat_x_plane(int64_t read_lanes) const;
    // Element offset in an x plane of tap t at output position (0, 0).
    int64_t x_tap(const width_plane &plane, int64_t tap) const;
    // Per output channel: entries keyed by (input channel, tap).
    sparse_rows forward_rows(const csr_pattern &p) const;

    // Backward-data source: dY padded by l.dy_pad, rows long enough for
    // `read_lanes(phase)` lanes of every phase's taps (and `align` long a
    // whole number of times, as x_plane's).
    width_plane dy_plane(const std::vector<int64_t> &read_lanes, int64_t align = 1) const;
    // The same when an image is one output row of the SpMM (stride 1,
    // narrow rows: flat_spmm_split): rows at the padded width back to back,
    // zero rows past the image for the farthest tap's read of the last
    // vector.
    width_plane flat_dy_plane(const conv_layout::phase &f, int64_t read_lanes) const;
    // Element offset in the dY plane of tap t of phase f at its first position.
    int64_t dy_tap(const width_plane &plane, const conv_layout::phase &f, int64_t tap) const;
    // Per input channel: the phase's entries keyed by (output channel, tap).
    sparse_rows backward_data_rows(const csr_pattern &p, const conv_layout::phase &f) const;
};

} // namespace qsp::detail
