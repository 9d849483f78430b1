// Sparse Conv2d on the JIT kernels, f32 and s8, batch-innermost
// (conv_layout.hpp): the same SpMM / SDDMM kernels as Linear, walking a grid
// of pixels; the per-layer plans (entries, offsets, stride phases, row
// partitions) are built once per problem and cached; every batch size
// shares them. Threading as for Linear: nnz-balanced row parts written by
// one thread each, tiles in order inside a part, so no write collides and
// results do not depend on the thread count.
#include "primitives/sparse_jit/jit_conv2d.hpp"

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "jit/jit_uni_sddmm_kernel.hpp"
#include "jit/jit_uni_spmm_scatter_kernel.hpp"
#include "primitives/core/s8_dy_quantization.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "primitives/core/s8_src_quantization.hpp"
#include "primitives/passes/bias_grad.hpp"
#include "primitives/passes/conv_tiles.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "primitives/sparse_jit/conv_common.hpp"
#include "primitives/sparse_jit/conv_layout.hpp"
#include "primitives/sparse_jit/jit_plan.hpp"
#include "primitives/sparse_jit/plan_cache.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

constexpr int64_t tb = jit::tile_batch;
constexpr int64_t rb = jit::tile_row_bytes;     // f32 / int32 / quad tile rows
constexpr int64_t rb8 = jit::s8_tile_row_bytes; // int8 tile rows

// for_parts_and_tiles (jit_plan.hpp), timed as kernel time of dir.
template <typename body_t>
void for_parts(direction dir, const std::vector<int64_t> &bounds, int64_t tiles, int threads,
               body_t body) {
    const auto timed = kernel_time(dir);
    for_parts_and_tiles(bounds, tiles, threads, body);
}

// body(tile, h0, h1) for every batch tile and block [h0, h1) of a pixel
// grid's rows, spread over the team: blocks write disjoint pixels.
template <typename body_t>
void for_pixel_blocks(direction dir, int64_t tiles, int64_t grid_rows, int threads, body_t body) {
    const auto timed = kernel_time(dir);
    const int64_t blocks = std::min<int64_t>(grid_rows, std::max<int64_t>(1, 2 * threads / tiles));
    const int64_t items = tiles * blocks;
#pragma omp parallel num_threads(threads)
    {
        const int nthr = omp_get_num_threads(), tid = omp_get_thread_num();
        for (int64_t item = tid; item < items; item += nthr) {
            const int64_t tile = item / blocks, b = item % blocks;
            body(tile, grid_rows * b / blocks, grid_rows * (b + 1) / blocks);
        }
    }
}

// The source rows' byte offsets of a scatter walk.
std::vector<int32_t> src_offsets(const std::vector<int64_t> &src_rows, int64_t row_bytes) {
    std::vector<int32_t> out;
    for (int64_t r : src_rows)
        out.push_back(static_cast<int32_t>(r * row_bytes));
    return out;
}

std::vector<std::shared_ptr<const jit::jit_spmm_scatter_kernel>>
scatter_kernels(cpu_isa isa, jit::sparse_dtype dt, jit::s8_word word = jit::s8_word::quad) {
    std::vector<std::shared_ptr<const jit::jit_spmm_scatter_kernel>> out;
    for (int nv = 1; nv <= jit::tile_batch / jit::vector_lanes(isa); ++nv) {
        jit::sparse_kernel_params k = jit::make_sparse_kernel_params(isa, dt, nv);
        k.word = word;
        out.push_back(jit::spmm_scatter_kernel(k));
    }
    return out;
}

// One scatter walk of a plan: the entries' plan (f32: entry_plan, s8:
// quad_plan, their offsets being the destination rows') and the source rows.
template <typename plan_t> struct scatter_walk {
    plan_t entries;
    std::vector<int32_t> src;
    const std::vector<int64_t> &row_ptr() const;
};
template <> const std::vector<int64_t> &scatter_walk<entry_plan>::row_ptr() const {
    return entries.row_ptr;
}
template <> const std::vector<int64_t> &scatter_walk<quad_plan>::row_ptr() const {
    return entries.quad_ptr;
}

// Runs a scatter walk over a pixel grid of every tile: dst rows are
// (channel, pixel) with `dst_rows` channels per pixel, `dst_row_stride`
// bytes apart.
template <typename walk_t, typename kernels_t>
void run_scatter(direction dir, const walk_t &w, const kernels_t &kernels, int lanes, int64_t batch,
                 const void *values, const uint8_t *src, int64_t src_tile_bytes, uint8_t *dst,
                 int64_t dst_tile_bytes, int64_t dst_rows, int64_t dst_row_stride,
                 const jit::pixel_grid &grid, int threads) {
    for_pixel_blocks(
            dir, tile_count(batch), grid.n_h, threads, [&](int64_t tile, int64_t h0, int64_t h1) {
                jit::spmm_scatter_call_params c{values,
                                                w.entries.offsets.data(),
                                                w.src.data(),
                                                w.row_ptr().data(),
                                                static_cast<int64_t>(w.src.size()),
                                                dst_rows,
                                                dst_row_stride,
                                                src + tile * src_tile_bytes + h0 * grid.src_h,
                                                dst + tile * dst_tile_bytes + h0 * grid.dst_h};
                c.pix = grid;
                c.pix.n_h = h1 - h0;
                (*kernels[tile_vectors(batch, tile, lanes) - 1])(c);
            });
}

// The scatter walks of both schemes, built alike: entry_plan over single
// entries (f32, per_word 1) or quad_plan over words of per_word input
// channels (s8: 4, a quad, or 2, a pair); either way a destination row is
// one pixel's channels, contiguous (rb apart).
template <typename plan_t>
scatter_walk<plan_t> make_walk(const conv_layout::scatter_rows &walk, int threads, int per_word) {
    const auto offset = [](int64_t, int64_t channel) { return channel * rb; };
    if constexpr (std::is_same_v<plan_t, quad_plan>)
        return {quad_plan(walk.rows, offset, threads, per_word), src_offsets(walk.src_row, rb)};
    else
        return {plan_t(walk.rows, offset, threads), src_offsets(walk.src_row, rb)};
}

template <typename plan_t>
std::unique_ptr<scatter_walk<plan_t>> forward_walk(const conv_layout &l, const csr_pattern &p,
                                                   int threads, int per_word = 1) {
    return std::make_unique<scatter_walk<plan_t>>(
            make_walk<plan_t>(l.forward_scatter(p, per_word), threads, per_word));
}

// Backward-data: one walk per stride phase; on_phase(phase, walk, rows).
template <typename plan_t, typename on_phase_t>
void backward_data_walks(const conv_layout &l, const csr_pattern &p, int threads, int per_word,
                         on_phase_t on_phase) {
    for (const auto &f : l.phases) {
        const auto walk = l.backward_data_scatter(p, f, per_word);
        on_phase(f, make_walk<plan_t>(walk, threads, per_word), walk.rows);
    }
}

// The pixel grid over `rows_h` rows of the output: the source (padded x,
// `src_pixel_bytes` per pixel) moves by the stride, the destination (one
// output pixel, `dst_pixel_bytes`) by one.
jit::pixel_grid output_grid(const conv_layout &l, int64_t rows_h, int64_t src_pixel_bytes,
                            int64_t dst_pixel_bytes) {
    jit::pixel_grid g;
    g.n_h = rows_h;
    g.n_w = l.out_w;
    g.src_h = l.sh * l.wp * src_pixel_bytes;
    g.src_w = l.sw * src_pixel_bytes;
    g.dst_h = l.out_w * dst_pixel_bytes;
    g.dst_w = dst_pixel_bytes;
    return g;
}

// Backward-data: phase f's pixel grid over the input; the source (padded
// dY, `src_pixel_bytes` per pixel) moves by one pixel, the destination (dX,
// in_c rows per pixel) by the stride.
jit::pixel_grid phase_grid(const conv_layout &l, const conv_layout::phase &f,
                           int64_t src_pixel_bytes) {
    jit::pixel_grid g;
    g.n_h = f.n_h;
    g.n_w = f.n_w;
    g.src_h = l.owp * src_pixel_bytes;
    g.src_w = src_pixel_bytes;
    g.dst_h = l.sh * l.in_w * l.in_c * rb;
    g.dst_w = l.sw * l.in_c * rb;
    return g;
}

// ---- f32 -----------------------------------------------------------------------

class jit_conv2d_f32_plan : public jit_plan {
public:
    jit_conv2d_f32_plan(const problem &p, cpu_isa isa)
        : jit_plan(p), l_(p.conv), lanes_(jit::vector_lanes(isa)) {
        const int threads = p.num_threads;
        switch (p.dir) {
            case direction::forward:
                forward_ = forward_walk<entry_plan>(l_, p.pattern, threads);
                scatter_ = scatter_kernels(isa, jit::sparse_dtype::f32);
                break;
            case direction::backward_data:
                backward_data_walks<entry_plan>(l_, p.pattern, threads, 1,
                                                [&](const conv_layout::phase &f,
                                                    scatter_walk<entry_plan> walk,
                                                    const sparse_rows &) {
                                                    phases_.push_back({f, std::move(walk)});
                                                });
                scatter_ = scatter_kernels(isa, jit::sparse_dtype::f32);
                break;
            case direction::backward_weights:
                entries_ = std::make_unique<entry_plan>(
                        l_.forward_rows(p.pattern),
                        [&](int64_t oc, int64_t col) { return l_.x_row(oc, col) * rb; }, threads);
                for (int nv = 1; nv <= jit::tile_batch / lanes_; ++nv)
                    sddmm_.push_back(jit::sddmm_kernel(
                            jit::make_sparse_kernel_params(isa, jit::sparse_dtype::f32, nv)));
                break;
        }
    }

private:
    struct phase_plan {
        conv_layout::phase phase;
        scatter_walk<entry_plan> walk;
    };

    int64_t x_rows() const { return l_.in_c * l_.hp * l_.wp; }

    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, y_rows = l_.out_c * l_.out_pixels();
        float *x = sp.get<float>(0, tiled_elems(B, x_rows()));
        float *y = sp.get<float>(1, tiled_elems(B, y_rows));
        float *values = sp.get<float>(2, p_.pattern.nnz());
        pack_conv_tiles(t.src, B, l_.in_c, l_.in_h, l_.in_w, l_.x_pad, x, nt);
        run_scatter(p_.dir, *forward_, scatter_, lanes_, B,
                    forward_->entries.values(t.weights, values, nt),
                    reinterpret_cast<const uint8_t *>(x), x_rows() * rb,
                    reinterpret_cast<uint8_t *>(y), y_rows * rb, l_.out_c, rb,
                    output_grid(l_, l_.out_h, l_.in_c * rb, l_.out_c * rb), nt);
        unpack_conv_tiles(y, B, l_.out_c, l_.out_pixels(), t.bias, t.dst, nt);
        return nullptr;
    }

    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, dy_rows = l_.out_c * l_.ohp * l_.owp,
                      dx_rows = l_.in_c * l_.in_pixels();
        float *dy = sp.get<float>(0, tiled_elems(B, dy_rows));
        float *dx = sp.get<float>(1, tiled_elems(B, dx_rows));
        float *values = sp.get<float>(2, p_.pattern.nnz());
        pack_conv_tiles(t.diff_dst, B, l_.out_c, l_.out_h, l_.out_w, l_.dy_pad, dy, nt);
        for (const phase_plan &f : phases_) {
            const int64_t start = (f.phase.ih0 * l_.in_w + f.phase.iw0) * l_.in_c * rb;
            run_scatter(p_.dir, f.walk, scatter_, lanes_, B,
                        f.walk.entries.values(t.weights, values, nt),
                        reinterpret_cast<const uint8_t *>(dy), dy_rows * rb,
                        reinterpret_cast<uint8_t *>(dx) + start, dx_rows * rb, l_.in_c, rb,
                        phase_grid(l_, f.phase, l_.out_c * rb), nt);
        }
        unpack_conv_tiles(dx, B, l_.in_c, l_.in_pixels(), nullptr, t.diff_src, nt);
        return nullptr;
    }

    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, dy_rows = l_.out_c * l_.out_pixels();
        float *x = sp.get<float>(0, tiled_elems(B, x_rows()));
        float *dy = sp.get<float>(1, tiled_elems(B, dy_rows));
        pack_conv_tiles(t.src, B, l_.in_c, l_.in_h, l_.in_w, l_.x_pad, x, nt);
        pack_tiles(t.diff_dst, B, dy_rows, dy, nt); // channel-major: rows (oc, pixel)
        std::fill(t.diff_weights, t.diff_weights + p_.pattern.nnz(), 0.f);
        const jit::pixel_grid grid = output_grid(l_, l_.out_h, l_.in_c * rb, rb);
        for_parts(p_.dir, entries_->bounds, tile_count(B), nt, [&](int part, int64_t tile) {
            jit::sddmm_call_params c{entries_->offsets.data(),
                                     entries_->row_ptr.data(),
                                     entries_->bounds[part],
                                     entries_->bounds[part + 1],
                                     x + tile * x_rows() * tb,
                                     dy + tile * dy_rows * tb,
                                     t.diff_weights};
            c.dy_row_stride = l_.out_pixels() * rb;
            c.pix = grid;
            (*sddmm_[tile_vectors(B, tile, lanes_) - 1])(c);
        });
        if (t.diff_bias) bias_grad(t.diff_dst, t.diff_bias, B, l_.out_c, l_.out_pixels(), nt);
        return nullptr;
    }

    conv_layout l_;
    int lanes_;
    std::unique_ptr<scatter_walk<entry_plan>> forward_; // forward
    std::vector<phase_plan> phases_;                    // backward-data, per stride phase
    std::unique_ptr<entry_plan> entries_;               // backward-weights
    std::vector<std::shared_ptr<const jit::jit_spmm_scatter_kernel>> scatter_;
    std::vector<std::shared_ptr<const jit::jit_sddmm_kernel>> sddmm_;
};

// ---- s8 ------------------------------------------------------------------------

class jit_conv2d_s8_plan : public jit_plan {
public:
    jit_conv2d_s8_plan(const problem &p, cpu_isa isa)
        : jit_plan(p), l_(p.conv), lanes_(jit::vector_lanes(isa)), word_(jit::s8_conv_word(isa)),
          per_word_(jit::channels_per_word(word_)) {
        const int threads = p.num_threads;
        switch (p.dir) {
            case direction::forward:
                forward_ = forward_walk<quad_plan>(l_, p.pattern, threads, per_word_);
                scatter_ = scatter_kernels(isa, jit::sparse_dtype::s8, word_);
                break;
            case direction::backward_data:
                backward_data_walks<quad_plan>(l_, p.pattern, threads, per_word_,
                                               [&](const conv_layout::phase &f,
                                                   scatter_walk<quad_plan> walk,
                                                   const sparse_rows &rows) {
                                                   phase_plan pp{f, std::move(walk), {}};
                                                   for (int64_t key : rows.key)
                                                       pp.dst_channel.push_back(key / per_word_);
                                                   phases_.push_back(std::move(pp));
                                               });
                scatter_ = scatter_kernels(isa, jit::sparse_dtype::s8, word_);
                break;
            case direction::backward_weights:
                entries_ = std::make_unique<entry_plan>(
                        l_.forward_rows(p.pattern),
                        [&](int64_t oc, int64_t col) { return l_.x_row(oc, col) * rb8; }, threads);
                sddmm_ = jit::sddmm_kernel(
                        jit::make_sparse_kernel_params(isa, jit::sparse_dtype::s8, 1));
                tap_of_entry_ = window_taps_of_entries(l_, p.pattern, *entries_);
                break;
        }
    }

    // The s8 SDDMM sums int32 pieces of at most this many batch x pixel
    // terms (255 * 127 * 65536 < 2^31); the pieces are added in int64.
    static constexpr int64_t max_piece_pixels = int32_safe_reduction_length / jit::tile_batch;

    // Backward-data reads dY only through s8::quantize_dx_gradient.
    bool quantizes_diff_dst_only() const override { return p_.dir == direction::backward_data; }
    // Backward-weights reads G1 as plain int8 (then tiled): in a fused
    // backward, backward-data makes it in its own pass over dY.
    shared_gradient::form shared_form_read() const override {
        return p_.dir == direction::backward_weights ? shared_gradient::form::s8_plain_dy_q
                                                     : shared_gradient::form::none;
    }

private:
    struct phase_plan {
        conv_layout::phase phase;
        scatter_walk<quad_plan> walk;
        std::vector<int64_t> dst_channel; // per entry: its input channel
    };

    // The pass that packs the scatter's source in this plan's words.
    pack_conv_quad_tiles_fn *pack_words() const {
        return word_ == jit::s8_word::pair ? pack_conv_pair_tiles : pack_conv_quad_tiles;
    }

    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, nnz = p_.pattern.nnz(), oc = l_.out_c;
        const int64_t x_words = (l_.in_c + per_word_ - 1) / per_word_;
        const int64_t x_rows = x_words * l_.hp * l_.wp, y_rows = oc * l_.out_pixels();
        const int64_t src_elems = B * l_.in_c * l_.in_pixels();
        const quad_plan &q = forward_->entries;
        const s8::workspace_view &ws = t.workspace; // training: Xq, Wq kept for the backward
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, oc);
        auto *words = sp.get<uint32_t>(2, q.quads());
        auto *row_sums = sp.get<int32_t>(3, q.rows);
        auto *x = sp.get<uint8_t>(4, tile_count(B) * x_rows * rb);
        auto *acc = sp.get<int32_t>(5, tiled_elems(B, y_rows));
        auto *row_scale = sp.get<float>(6, oc);
        auto *correction = sp.get<int32_t>(7, oc);
        auto *local_xq = t.workspace ? nullptr : sp.get<int8_t>(8, src_elems);
        quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        q.fill(wq, words, row_sums, nt);
        const int64_t *rp = p_.pattern.row_ptr();
        for (int64_t o = 0; o < oc; ++o) { // what the +128 shift adds to each output channel
            int32_t sum = 0;
            for (int64_t e = rp[o]; e < rp[o + 1]; ++e)
                sum += wq[e];
            correction[o] = 128 * sum;
        }
        int8_t *xq = t.workspace ? ws.src_q() : local_xq;
        const float sx = s8::quantized_src(t, src_elems, xq, nt);
        if (t.workspace) ws.set_src_scale(sx);
        pack_words()(xq, B, l_.in_c, l_.in_h, l_.in_w, l_.x_pad, x, nt);
        for (int64_t o = 0; o < oc; ++o)
            row_scale[o] = s8::forward_scale(sx, w_scale[o]);
        run_scatter(p_.dir, *forward_, scatter_, lanes_, B, words, x, x_rows * rb,
                    reinterpret_cast<uint8_t *>(acc), y_rows * rb, oc, rb,
                    output_grid(l_, l_.out_h, x_words * rb, oc * rb), nt);
        unpack_conv_s32_tiles(acc, B, oc, l_.out_pixels(), correction, l_.out_pixels(), row_scale,
                              l_.out_pixels(), t.bias, t.dst, nt);
        return nullptr;
    }

    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, oc = l_.out_c, in_px = l_.in_pixels();
        const int64_t dy_words = (oc + per_word_ - 1) / per_word_;
        const int64_t dy_rows = dy_words * l_.ohp * l_.owp, dx_rows = l_.in_c * in_px;
        int64_t max_quads = 1, max_rows = 1;
        for (const phase_plan &f : phases_) {
            max_quads = std::max(max_quads, f.walk.entries.quads());
            max_rows = std::max(max_rows, f.walk.entries.rows);
        }
        const s8::workspace_view &ws = t.workspace; // the forward's Wq and scales
        const int8_t *wq = ws.weights_q();
        const float *w_scale = ws.weight_scale();
        auto *g2 = sp.get<int8_t>(2, B * oc * l_.out_pixels());
        auto *dy = sp.get<uint8_t>(3, tile_count(B) * dy_rows * rb);
        auto *acc = sp.get<int32_t>(4, tiled_elems(B, dx_rows));
        auto *words = sp.get<uint32_t>(5, max_quads);
        auto *row_sums = sp.get<int32_t>(6, max_rows);
        auto *phase_corr = sp.get<int32_t>(7, l_.in_c);
        auto *correction = sp.get<int32_t>(8, dx_rows); // channel-major: (ic, pixel)
        const float sg2 = s8::quantize_dx_gradient(t, B * oc * l_.out_pixels(), w_scale, oc,
                                                   l_.out_pixels(), g2, nt);
        pack_words()(g2, B, oc, l_.out_h, l_.out_w, l_.dy_pad, dy, nt);
        for (const phase_plan &f : phases_) {
            const quad_plan &q = f.walk.entries;
            q.fill(wq, words, row_sums, nt);
            // what the +128 shift adds to each input channel in this phase
            std::fill(phase_corr, phase_corr + l_.in_c, 0);
            for (size_t l = 0; l < f.dst_channel.size(); ++l)
                phase_corr[f.dst_channel[l]] += 128 * wq[q.value_index[l]];
            const int64_t start = (f.phase.ih0 * l_.in_w + f.phase.iw0) * l_.in_c * rb;
            run_scatter(p_.dir, f.walk, scatter_, lanes_, B, words, dy, dy_rows * rb,
                        reinterpret_cast<uint8_t *>(acc) + start, dx_rows * rb, l_.in_c, rb,
                        phase_grid(l_, f.phase, dy_words * rb), nt);
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t ic = 0; ic < l_.in_c; ++ic)
                for (int64_t a = 0; a < f.phase.n_h; ++a)
                    for (int64_t b = 0; b < f.phase.n_w; ++b)
                        correction[ic * in_px + (f.phase.ih0 + a * l_.sh) * l_.in_w + f.phase.iw0
                                   + b * l_.sw] = phase_corr[ic];
        }
        unpack_conv_s32_tiles(acc, B, l_.in_c, in_px, correction, 1, &sg2, dx_rows, nullptr,
                              t.diff_src, nt);
        return nullptr;
    }

    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, nnz = p_.pattern.nnz(), oc = l_.out_c;
        const int64_t x_rows = l_.in_c * l_.hp * l_.wp, dy_rows = oc * l_.out_pixels();
        const int64_t taps = l_.in_c * l_.kh * l_.kw, tiles = tile_count(B);
        const s8::workspace_view &ws = t.workspace;
        const int8_t *xq = ws.plain_src_q();
        auto *g1 = sp.get<uint8_t>(0, tiles * dy_rows * rb8);
        auto *x = sp.get<int8_t>(1, tiles * x_rows * rb8);
        auto *piece = sp.get<int32_t>(2, nnz + jit::sddmm_offset_padding);
        auto *acc = sp.get<int64_t>(3, nnz);
        auto *plane_sum = sp.get<int32_t>(4, l_.in_c * l_.in_pixels());
        auto *window_sum = sp.get<int64_t>(5, taps);
        const float sg1 = s8::dw_gradient_tiles(t, B, dy_rows, oc, g1, nt);
        pack_conv_s8_tiles(xq, B, l_.in_c, l_.in_h, l_.in_w, l_.x_pad, x, plane_sum, nt);
        conv_window_sums(l_, plane_sum, window_sum, nt);
        std::fill(acc, acc + nnz, int64_t(0));
        // Pieces: whole output rows, at most max_piece_pixels pixels per tile.
        const int64_t rows_per_piece = std::max<int64_t>(1, max_piece_pixels / l_.out_w);
        for (int64_t tile = 0; tile < tiles; ++tile)
            for (int64_t oh0 = 0; oh0 < l_.out_h; oh0 += rows_per_piece) {
                const int64_t rows = std::min(rows_per_piece, l_.out_h - oh0);
                std::fill(piece, piece + nnz, 0);
                const jit::pixel_grid grid = output_grid(l_, rows, l_.in_c * rb8, rb8);
                for_parts(p_.dir, entries_->bounds, 1, nt, [&](int part, int64_t) {
                    jit::sddmm_call_params c{
                            entries_->offsets.data(),
                            entries_->row_ptr.data(),
                            entries_->bounds[part],
                            entries_->bounds[part + 1],
                            x + (tile * x_rows + oh0 * l_.sh * l_.wp * l_.in_c) * rb8,
                            g1 + (tile * dy_rows + oh0 * l_.out_w) * rb8,
                            piece};
                    c.dy_row_stride = l_.out_pixels() * rb8;
                    c.pix = grid;
                    (*sddmm_)(c);
                });
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t e = 0; e < nnz; ++e)
                    acc[e] += piece[e];
            }
        const float scale = s8::backward_weights_scale(sg1, ws.src_scale());
        const int64_t dy_shift = jit::sddmm_dy_shift(sddmm_->params()); // of G + 128, in the sums
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t e = 0; e < nnz; ++e)
            t.diff_weights[e] =
                    static_cast<float>(acc[e] - dy_shift * window_sum[tap_of_entry_[e]]) * scale;
        if (t.diff_bias) bias_grad(t.diff_dst, t.diff_bias, B, oc, l_.out_pixels(), nt);
        return nullptr;
    }

    conv_layout l_;
    int lanes_;
    jit::s8_word word_; // source words: quads, or pairs without VNNI (jit::s8_conv_word)
    int per_word_;      // channels per source word
    std::unique_ptr<scatter_walk<quad_plan>> forward_; // forward
    std::vector<phase_plan> phases_;                   // backward-data, per stride phase
    std::unique_ptr<entry_plan> entries_;              // backward-weights
    std::vector<int64_t> tap_of_entry_;                // backward-weights
    std::vector<std::shared_ptr<const jit::jit_spmm_scatter_kernel>> scatter_;
    std::shared_ptr<const jit::jit_sddmm_kernel> sddmm_;
};

// ---- implementations ---------------------------------------------------------------

} // namespace

std::string conv_isa_refusal(const problem &p, quant_scheme scheme, cpu_isa isa,
                             conv_vectorization strategy) {
    if (p.scheme != scheme) return std::string(to_string(scheme)) + " only";
    if (p.vectorization != conv_vectorization::any && p.vectorization != strategy)
        return std::string("vectorizes over ") + to_string(strategy) + "; attr.vectorization is "
               + to_string(p.vectorization);
    return jit_tier_refusal(scheme, isa);
}

std::vector<int64_t> window_taps_of_entries(const conv_layout &l, const csr_pattern &p,
                                            const entry_plan &entries) {
    std::vector<int64_t> taps(static_cast<size_t>(p.nnz()));
    for (int64_t oc = 0; oc < l.out_c; ++oc)
        for (int64_t i = entries.row_ptr[oc]; i < entries.row_ptr[oc + 1]; ++i) {
            const int64_t v = entries.value_index[i];
            const auto tp = l.decode(p.col_idx()[v]);
            const int64_t ic = l.group_of_out(oc) * l.icg + tp.ic;
            taps[i] = (ic * l.kh + tp.kh) * l.kw + tp.kw;
        }
    return taps;
}

void conv_window_sums(const conv_layout &l, const int32_t *plane_sum, int64_t *window_sum,
                      int num_threads) {
    const int64_t px = l.in_pixels();
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t ic = 0; ic < l.in_c; ++ic) {
        const int32_t *s = plane_sum + ic * px;
        for (int64_t k_h = 0; k_h < l.kh; ++k_h)
            for (int64_t k_w = 0; k_w < l.kw; ++k_w) {
                int64_t sum = 0;
                for (int64_t oh = 0; oh < l.out_h; ++oh) {
                    const int64_t ih = oh * l.sh + k_h * l.dh - l.x_pad.top;
                    if (ih < 0 || ih >= l.in_h) continue;
                    for (int64_t ow = 0; ow < l.out_w; ++ow) {
                        const int64_t iw = ow * l.sw + k_w * l.dw - l.x_pad.left;
                        if (iw >= 0 && iw < l.in_w) sum += s[ih * l.in_w + iw];
                    }
                }
                window_sum[(ic * l.kh + k_h) * l.kw + k_w] = sum;
            }
    }
}

namespace {

// Why the batch-innermost kernels cannot take a Conv2d problem ("" if they can).
std::string conv_refusal(const problem &p, quant_scheme scheme, cpu_isa isa) {
    std::string why = conv_isa_refusal(p, scheme, isa, conv_vectorization::batch);
    if (!why.empty()) return why;
    const conv_layout l(p.conv);
    constexpr int64_t limit = std::numeric_limits<int32_t>::max() / jit::tile_row_bytes;
    if (l.in_c * l.hp * l.wp > limit || l.out_c * l.ohp * l.owp > limit
        || l.in_c * l.in_pixels() > limit || l.out_c * l.out_pixels() > limit)
        return "a tensor's tile rows exceed the 32-bit tile offsets";
    if (scheme == quant_scheme::s8) {
        const int64_t fwd_terms = l.icg * l.kh * l.kw, bwd_terms = l.ocg * l.kh * l.kw;
        if (std::max(fwd_terms, bwd_terms) > int32_safe_reduction_length)
            return "a reduction of " + std::to_string(std::max(fwd_terms, bwd_terms))
                   + " terms could overflow int32";
        if (l.out_w > jit_conv2d_s8_plan::max_piece_pixels)
            return "output width " + std::to_string(l.out_w) + " > "
                   + std::to_string(jit_conv2d_s8_plan::max_piece_pixels)
                   + ": one output row would overflow the int32 pieces of backward-weights";
    }
    return "";
}

} // namespace

implementation jit_conv2d_batch(quant_scheme scheme, cpu_isa isa) {
    const char *name = jit_implementation_name(isa, "batch");
    return {name,
            [scheme, isa](const problem &p) { return conv_refusal(p, scheme, isa); },
            [name, scheme, isa](const problem &p) -> std::shared_ptr<const kernel> {
                return cached_plan(name, isa, p, [&]() -> std::shared_ptr<const kernel> {
                    if (scheme == quant_scheme::s8)
                        return std::make_shared<const jit_conv2d_s8_plan>(p, isa);
                    return std::make_shared<const jit_conv2d_f32_plan>(p, isa);
                });
            },
            false,
            op_kind::conv2d,
            {}};
}

} // namespace qsp::detail
