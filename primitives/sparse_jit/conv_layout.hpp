// Conv2d on the sparse JIT kernels, "batch-innermost": every tensor is kept
// in tiles of 64 batch elements (jit/tile_abi.hpp) whose rows are (channel,
// h, w) positions, so a weight (oc, ic, kh, kw) is one broadcast and a few
// vector multiply-adds per output pixel, and the kernels' pixel grid walks
// the output (forward, backward-weights) or the input (backward-data).
//
//   forward           x tiles, zero-padded: rows (h + top + bottom, w + left +
//                     right, ic), pixel-major (passes/conv_tiles.hpp says why);
//                     y tiles rows (oh, ow, oc). Per output pixel, each source
//                     row (ic, kh, kw), read at (ic, oh * sh + kh * dh,
//                     ow * sw + kw * dw), is loaded once and added into the
//                     rows oc of its nonzeros (the scatter SpMM: y's rows of
//                     one pixel stay in L1, x is read once per tap)
//   backward-data     the same per input pixel, split by stride phase
//                     (ih + top) % sh, (iw + left) % sw: in one phase, source
//                     rows are the taps (oc, kh, kw) whose output position is
//                     whole, read from dY tiles padded so that every such tap
//                     reads inside them; each input pixel is written by one
//                     thread only
//   backward-weights  an SDDMM whose dot products run over batch and pixels
//
// This header states the geometry once for the f32 and s8 plans.
#pragma once

#include <cstdint>
#include <vector>

#include "primitives/core/problem.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"

namespace qsp::detail {

struct conv_layout {
    int64_t in_c, in_h, in_w, out_c, out_h, out_w;
    int64_t kh, kw, sh, sw, dh, dw, groups, icg, ocg;
    spatial_pad x_pad;  // the convolution's own padding
    int64_t hp, wp;     // padded input
    spatial_pad dy_pad; // backward-data: dY padded so every tap reads inside
    int64_t ohp, owp;   // padded dY

    // A stride phase of the input, for backward-data: the real input
    // positions (ih, iw) with (ih + top) % sh == ph and (iw + left) % sw == pw.
    struct phase {
        int64_t ph, pw;
        int64_t ih0, iw0; // the first such position
        int64_t n_h, n_w; // how many along h and w (>= 1)
        int64_t qh0, qw0; // (ih0 + top - ph) / sh, (iw0 + left - pw) / sw
    };
    std::vector<phase> phases;

    explicit conv_layout(const conv2d_shape &s);

    int64_t out_pixels() const { return out_h * out_w; }
    int64_t in_pixels() const { return in_h * in_w; }
    int64_t group_of_out(int64_t oc) const { return oc / ocg; }

    struct tap {
        int64_t ic, kh, kw; // ic within the group
    };
    tap decode(int64_t col) const { return {col / (kh * kw), (col / kw) % kh, col % kw}; }

    // Backward-weights: the padded x tile row that entry (oc, col) reads at
    // output pixel (0, 0) (rows are pixel-major: (pixel, channel)), and the
    // problem per output channel (the CSR).
    int64_t x_row(int64_t oc, int64_t col) const;
    sparse_rows forward_rows(const csr_pattern &p) const;
    // Backward-data: the padded dY (quad-)tile row, of `channels` rows per
    // pixel, that tap (c, kh, kw) of phase ph reads at the phase's first pixel.
    int64_t dy_row(const phase &ph, int64_t c, int64_t channels, int64_t kh, int64_t kw) const;

    // The scatter walks (tile_abi.hpp): source rows, each with the tile row
    // it reads at the grid's first pixel, and per source row its entries
    // keyed by destination channel (s8: channel * per_word + the source
    // channel's slot in its word of per_word channels, 4 a quad, 2 a pair,
    // so that quad_plan packs one dword per destination; f32: per_word 1).
    struct scatter_rows {
        sparse_rows rows;
        std::vector<int64_t> src_row;
    };
    // Forward: source rows (ic / per_word, kh, kw); destinations oc.
    scatter_rows forward_scatter(const csr_pattern &p, int per_word) const;
    // Backward-data, one phase: source rows (oc / per_word, kh, kw) of the
    // phase's taps; destinations ic.
    scatter_rows backward_data_scatter(const csr_pattern &p, const phase &ph, int per_word) const;

    // m: the output row offset of tap k in a phase, (p - k * d) / s, when whole.
    static bool tap_in_phase(int64_t p, int64_t k, int64_t d, int64_t s, int64_t &m);
};

} // namespace qsp::detail
