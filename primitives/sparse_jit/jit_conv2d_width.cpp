// Sparse Conv2d on the output-width-innermost JIT kernels (conv_width.hpp),
// f32 and s8. Plans (entries, offsets, plane geometry, kernels per chunk of
// an output row) are built once per problem and serve every batch size.
// Threading: whole images per thread when there are enough of them, else
// images x nnz-balanced channel parts; backward-weights splits channels
// only, each thread adding its entries' partial sums image after image.
// Every output element is summed by one call in one order: results do not
// depend on the thread count.
#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>

#include "jit/jit_uni_sddmm_width_kernel.hpp"
#include "jit/jit_uni_spmm_width_kernel.hpp"
#include "primitives/core/s8_dy_quantization.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "primitives/core/s8_src_quantization.hpp"
#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/bias_grad.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/width_planes.hpp"
#include "primitives/sparse_jit/conv_common.hpp"
#include "primitives/sparse_jit/conv_width.hpp"
#include "primitives/sparse_jit/jit_conv2d.hpp"
#include "primitives/sparse_jit/jit_plan.hpp"
#include "primitives/sparse_jit/plan_cache.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

using jit::sparse_dtype;

// Flat runs so far per direction (flat_width_runs_for_testing).
std::atomic<int64_t> flat_runs[3];

// A part of channel_statistics (passes/batch_norm.hpp) from the statistics
// a kernel call took while it wrote n values (jit::width_statistics): its
// lanes summed in double, the mean and the squares about it from the
// shifted sums.
statistics_part part_of(const jit::width_statistics &w, int64_t n) {
    statistics_part p;
    double sum = 0, squares = 0;
    p.range = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
    for (int l = 0; l < 16; ++l) {
        sum += w.sum[l], squares += w.squares[l];
        p.range.lowest = w.lowest[l] < p.range.lowest ? w.lowest[l] : p.range.lowest;
        p.range.highest = w.highest[l] > p.range.highest ? w.highest[l] : p.range.highest;
    }
    p.count = static_cast<double>(n);
    p.mean = w.shift + sum / p.count;
    p.m2 = std::max(0.0, squares - sum * sum / p.count);
    return p;
}

// Where the width kernels read their sources from aligned planes
// (sparse_kernel_params::shifts): the SpMM on AVX-512 (valignd rotates its
// loads), the SDDMM in f32 on both tiers (it rotates dY once per run; its
// s8 x planes hold bytes). A load that crosses a cache line costs Zen 4
// about 1.5x an aligned one, and on planes whose rows are not whole
// vectors (C3's 18 floats) almost every 64-byte load crossed one.
bool aligned_sources(cpu_isa isa) {
    return isa >= cpu_isa::avx512_core;
}
bool aligned_sddmm_sources(sparse_dtype dt) {
    return dt == sparse_dtype::f32;
}
// A kernel's source runs: `shifts` of them on aligned sources of
// `vector_bytes` vectors (0: the sources as they are).
struct source_runs {
    int shifts = 0;
    int64_t vector_bytes = 64;
    // the lanes (4-byte positions) an offset starts past the vector
    // boundary below it, and that boundary
    int64_t shift_of(int64_t offset_bytes) const { return offset_bytes % vector_bytes / 4; }
    int64_t aligned(int64_t offset_bytes) const {
        return offset_bytes - offset_bytes % vector_bytes;
    }
};
// The runs m's entries need on aligned sources: one more than their largest
// shift. offset(row, key / per_word): an entry's source offset (as
// width_entries').
source_runs runs_of(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &offset,
                    int64_t vector_bytes, int64_t per_word = 1) {
    source_runs runs{1, vector_bytes};
    for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t e = m.row_ptr[r]; e < m.row_ptr[r + 1]; ++e)
            runs.shifts =
                    std::max(runs.shifts,
                             static_cast<int>(runs.shift_of(offset(r, m.key[e] / per_word))) + 1);
    return runs;
}

// The kernels covering one output row: one per chunk of the split.
template <typename kernel_t> struct row_calls {
    width_split split;
    std::vector<std::shared_ptr<const kernel_t>> kernels;
};

// Output rows per kernel block: as many as the kernel's registers hold
// (and width_max_rows), balanced over an image's `out_rows`: 14 rows at up
// to 6 a block (AVX2 s8 quads, two vectors a row) go as 5, 5, 4 (6, 6, 2
// would make the last block a whole pass over the entries for a third of
// the work).
// out_rows 0: not known when the plan is made (images, which any batch
// size brings): as many as fit.
int balanced_rows(int64_t out_rows, int fit) {
    const int64_t most = std::max(1, std::min(jit::width_max_rows, fit));
    if (out_rows <= 0) return static_cast<int>(most);
    const int64_t blocks = (out_rows + most - 1) / most;
    return static_cast<int>((out_rows + blocks - 1) / blocks);
}

// The split of an output row over the SpMM kernels' vectors; the planes
// follow from it, and the kernels from the planes' row step.
width_split spmm_split(cpu_isa isa, sparse_dtype dt, int64_t width, jit::s8_word word) {
    const bool vnni = jit::make_sparse_kernel_params(isa, dt, 1).avx_vnni;
    return split_width(width, jit::vector_lanes(isa),
                       jit::spmm_width_max_accumulators(isa, dt, vnni, word));
}

// The flat SpMM's sums a block holds (images x the vectors of one): 8.
// More images a block make the source groups, sized to L1 for a block's
// images, smaller, and their sums' stores and reloads more frequent: C4
// (32 x 512 x 7 x 7, 90 %, Zen 4) f32 forward kernel 9.0 ms at two images
// of 4 vectors, 10.1 at 3, 10.8 at 4, 13.0 at 7 (the most the registers
// hold); one image 9.3. The main job's 96-channel 7 x 7 layer the same at
// 1-3.
constexpr int flat_accumulators = 8;

// The SpMM kernels of a split: out_rows per image (0: the flat SpMM's,
// a block of images), the source moving row_step bytes per output row.
// shifts: 0, or the shift runs of aligned sources.
row_calls<jit::jit_spmm_width_kernel> spmm_calls(cpu_isa isa, sparse_dtype dt,
                                                 const width_split &split, jit::s8_word word,
                                                 int64_t out_rows, int64_t row_step, int shifts) {
    jit::sparse_kernel_params base = jit::make_sparse_kernel_params(isa, dt, 1);
    base.word = word;
    base.row_step = row_step;
    base.shifts = shifts;
    const int max_acc = jit::spmm_width_max_accumulators(isa, dt, base.avx_vnni, word);
    row_calls<jit::jit_spmm_width_kernel> c{split, {}};
    for (int64_t ch = 0; ch < c.split.chunks(); ++ch) {
        jit::sparse_kernel_params k = base;
        k.n_vec = c.split.chunk_vectors(ch);
        k.n_rows = balanced_rows(out_rows, (out_rows > 0 ? max_acc : flat_accumulators) / k.n_vec);
        k.tail = c.split.tail(ch);
        c.kernels.push_back(jit::spmm_width_kernel(k));
    }
    return c;
}

// The split of flat rows (n_h rows of row_len side by side, whole vectors)
// against rows of n_w, or one of width 0 where it does not pay (flat_spmm_split
// says which pay); split_of(width): the kernels' split of a row that wide;
// `always`: taken whatever it saves (the s8 backward-weights).
template <typename split_of_t>
width_split flat_split(const split_of_t &split_of, int64_t n_h, int64_t n_w, int64_t row_len,
                       bool always = false) {
    const width_split rows = split_of(n_w), flat = split_of(n_h * row_len);
    if (!always && 5 * flat.vectors > 4 * n_h * rows.vectors) return {};
    return split_of(flat.read_lanes());
}

// The flat SpMM (stride 1 both ways): an image's output rows side by side
// at the source's padded width `row_len` make one row of the kernels, and a
// block of them a block of images. A lane past a row's last column sums a
// window that runs into the padding and the next row: the plan drops it
// (unflatten_width_rows). Rows narrower than a vector lose those lanes and
// more: 7 columns fill 7 of AVX-512's 16 lanes, 4 flat vectors an image
// where the rows took 7. Taken where it needs at most 4/5 of the rows'
// vectors; a split of width 0 where not. Its width is whole vectors: the
// flat rows go to a scratch whose channels are that long, the planes hold
// the reads of every vector, so the last one is stored (and reloaded
// between groups) whole, without a mask (AVX2's vmaskmovps is microcoded
// on AMD).
width_split flat_spmm_split(cpu_isa isa, sparse_dtype dt, jit::s8_word word, int64_t n_h,
                            int64_t n_w, int64_t row_len) {
    return flat_split([&](int64_t width) { return spmm_split(isa, dt, width, word); }, n_h, n_w,
                      row_len);
}

// Whether the flat SpMM's kernels can step a block of images of
// `image_bytes` (jit::check_width_row_step's bound: a block's last image
// within a 32-bit displacement).
bool flat_images_fit(int64_t image_bytes) {
    return image_bytes > 0
           && image_bytes <= (std::numeric_limits<int32_t>::max() - 4096) / jit::width_max_rows;
}

// s8 lanes are bytes: a dword lane sums 4 output columns, so a vector
// covers 4x the columns and no tail is masked (dY rows are zero-padded).
width_split sddmm_split(cpu_isa isa, sparse_dtype dt, int64_t width) {
    const bool vnni = jit::make_sparse_kernel_params(isa, dt, 1).avx_vnni;
    const int64_t lanes = jit::vector_lanes(isa) * (dt == sparse_dtype::s8 ? 4 : 1);
    return split_width(width, lanes, jit::sddmm_width_max_dy_vectors(isa, dt, vnni));
}

row_calls<jit::jit_sddmm_width_kernel> sddmm_calls(cpu_isa isa, sparse_dtype dt,
                                                   const width_split &split, int64_t out_rows,
                                                   int64_t row_step, int shifts = 0) {
    jit::sparse_kernel_params base = jit::make_sparse_kernel_params(isa, dt, 1);
    base.row_step = row_step;
    base.shifts = shifts;
    const int max_dy = jit::sddmm_width_max_dy_vectors(isa, dt, base.avx_vnni);
    row_calls<jit::jit_sddmm_width_kernel> c{split, {}};
    for (int64_t ch = 0; ch < c.split.chunks(); ++ch) {
        jit::sparse_kernel_params k = base;
        k.n_vec = c.split.chunk_vectors(ch);
        k.n_rows = balanced_rows(out_rows, max_dy / k.n_vec);
        k.tail = dt == sparse_dtype::s8 ? 0 : c.split.tail(ch);
        c.kernels.push_back(jit::sddmm_width_kernel(k));
    }
    return c;
}

// body(image, row_begin, row_end): whole images when there are enough of
// them to share, else images x the plan's channel parts; each thread takes
// the next item when it is done with its last. (Dealt round-robin in
// advance, a thread that the host slowed left the other waiting at the
// end: the C3 training step 1.02-1.08x faster taken this way on a busy
// 2-core EPYC, none slower. Each item's output is written by one call
// either way: results do not depend on who runs it.)
template <typename body_t>
void for_images(direction dir, int64_t batch, const std::vector<int64_t> &bounds, int threads,
                body_t body) {
    const auto timed = kernel_time(dir);
    const int64_t parts = batch >= 4 * threads ? 1 : static_cast<int64_t>(bounds.size()) - 1;
    const int64_t rows = bounds.back(), items = batch * parts;
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
    for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < items;
         item = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t b = item / parts, part = item % parts;
        body(b, parts == 1 ? 0 : bounds[part], parts == 1 ? rows : bounds[part + 1]);
    }
}

// body(row_begin, row_end) for each channel part, one thread per part.
template <typename body_t>
void for_parts(direction dir, const std::vector<int64_t> &bounds, int threads, body_t body) {
    const auto timed = kernel_time(dir);
    for_parts_and_tiles(bounds, 1, threads,
                        [&](int part, int64_t) { body(bounds[part], bounds[part + 1]); });
}

// The byte offset of an entry in planes holding `per_position` channels in
// each `position_bytes` position (f32: one channel, 4 bytes; s8 SpMM: a quad
// of channels, 4 bytes; s8 SDDMM: one channel, 1 byte). `index` is the
// entry's key, or for a quad plan the quad (its first key / 4);
// tap_at(tap) is the tap's element offset in a plane.
template <typename tap_at_t>
std::function<int64_t(int64_t, int64_t)> plane_offset(const conv_width &w, int64_t plane_size,
                                                      int64_t per_position, int64_t position_bytes,
                                                      tap_at_t tap_at) {
    return [&w, plane_size, per_position, position_bytes, tap_at](int64_t, int64_t index) {
        const int64_t key = index * per_position;
        return (w.key_channel(key) / per_position * plane_size + tap_at(w.key_tap(key)))
               * position_bytes;
    };
}

using grouping = source_groups;

// rows_touched: source rows one block of output rows reads per channel;
// channel_bytes_per_row: bytes of one such row per channel.
grouping make_grouping(const conv_width &w, const sparse_rows &m, int64_t channels,
                       int64_t rows_touched, int64_t channel_bytes_per_row) {
    return make_source_groups(
            m, m.row_ptr, nullptr, [&w](int64_t key) { return w.key_channel(key); }, channels,
            rows_touched * channel_bytes_per_row);
}
grouping make_grouping(const conv_width &w, const sparse_rows &m, const entry_plan &,
                       int64_t channels, int64_t rows_touched, int64_t channel_bytes_per_row) {
    return make_grouping(w, m, channels, rows_touched, channel_bytes_per_row);
}
grouping make_grouping(const conv_width &w, const sparse_rows &m, const quad_plan &quads,
                       int64_t channels, int64_t rows_touched, int64_t channel_bytes_per_row) {
    const std::vector<int64_t> item_of = quads.item_of();
    return make_source_groups(
            m, quads.quad_ptr, &item_of, [&w](int64_t key) { return w.key_channel(key); }, channels,
            rows_touched * channel_bytes_per_row);
}

// Source rows that a block of the kernels' output rows reads per channel.
template <typename calls_t> int64_t block_rows(const calls_t &calls, int64_t step, int64_t span) {
    return (calls.kernels.front()->params().n_rows - 1) * step + span;
}

// A phase of backward-data: the kernels over its row width and its entries.
template <typename entries_t> struct phase_plan {
    conv_layout::phase phase;
    row_calls<jit::jit_spmm_width_kernel> calls;
    std::unique_ptr<entries_t> entries;
    grouping groups;
};

// The phases with their splits (the kernels follow from their entries),
// and the dY plane all their reads fit in: rows of whole vectors on
// aligned sources, whose reads stop at the vector holding a row's last
// real lane.
template <typename entries_t>
width_plane make_phases(const conv_width &w, cpu_isa isa, sparse_dtype dt, jit::s8_word word,
                        std::vector<phase_plan<entries_t>> &phases) {
    const bool aligned = aligned_sources(isa);
    std::vector<int64_t> read_lanes;
    for (const auto &f : w.l.phases) {
        phases.push_back({f, {spmm_split(isa, dt, f.n_w, word), {}}, nullptr, {}});
        read_lanes.push_back(aligned ? f.n_w : phases.back().calls.split.read_lanes());
    }
    return w.dy_plane(read_lanes, aligned ? jit::vector_lanes(isa) : 1);
}

// A plan's items are its entries (entry_plan), or words of them
// (quad_plan: a group's runs then start at their first entries' words).
void runs_over_items(const entry_plan &, const sparse_rows &, grouping &) {}
void runs_over_items(const quad_plan &words, const sparse_rows &m, grouping &g) {
    const std::vector<int64_t> item_of = words.item_of();
    const int64_t per_row = g.n * g.runs + 1;
    for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t k = 0; k < per_row; ++k) {
            int64_t &at = g.ptr[r * per_row + k];
            at = at == m.row_ptr[r + 1] ? words.quad_ptr[r + 1] : item_of[at];
        }
}

// The entries of m and their groups (`rows_touched` source rows of
// `channel_bytes_per_row` per channel a block): on aligned sources each
// group's entries in runs by shift, their offsets down to the vector
// boundary (the kernels rotate what they load). offset(row, index): an
// item's source offset, index its key (f32) or word (s8: key / channels a
// word; a word's channels share a tap, so its entries share a run).
template <typename scheme_t, typename entries_t>
void width_entries(const conv_width &w, const sparse_rows &m,
                   const std::function<int64_t(int64_t, int64_t)> &offset, const source_runs &runs,
                   int64_t channels, int64_t rows_touched, int64_t channel_bytes_per_row,
                   int threads, jit::s8_word word, std::unique_ptr<entries_t> &entries,
                   grouping &groups) {
    if (runs.shifts == 0) {
        entries = scheme_t::entries(m, offset, threads, word);
        groups = make_grouping(w, m, *entries, channels, rows_touched, channel_bytes_per_row);
        return;
    }
    const int64_t per_word = scheme_t::spmm_per_position(word);
    shift_runs split = split_runs_by_shift(
            m, make_grouping(w, m, channels, rows_touched, channel_bytes_per_row), runs.shifts,
            [&offset, &runs, per_word](int64_t r, int64_t key) {
                return runs.shift_of(offset(r, key / per_word));
            });
    entries = scheme_t::entries(
            split.rows,
            [&offset, &runs](int64_t r, int64_t index) { return runs.aligned(offset(r, index)); },
            threads, word);
    groups = std::move(split.groups);
    runs_over_items(*entries, split.rows, groups);
}

// Runs the SpMM kernels of one output layout over every image: `src` holds
// `src_image` elements (of `elem_bytes`) per image, dst rows of channel r
// start at dst + r * dst_channel (floats) and are dst_row floats apart.
struct spmm_run {
    const void *values;
    const int32_t *offsets;
    const grouping *groups;
    const std::vector<int64_t> *bounds;
    const uint8_t *src;
    int64_t src_image_bytes, elem_bytes, n_out_rows;
    float *dst;
    int64_t dst_image, dst_channel, dst_row;
    const float *bias;
    const int32_t *correction;
    const float *scale;
    // Null, or the batch statistics the kernels take (forward): image b's
    // channel r's of chunk ch at (b * channels + r) * chunks + ch.
    jit::width_statistics *statistics = nullptr;
    // The flat SpMM (flat_spmm_split): a call's output rows are this many
    // images (the kernels' source step is src_image_bytes, dst_row unused,
    // no statistics); 0: an image's rows.
    int64_t images_per_call = 0;

    template <typename calls_t>
    void operator()(direction dir, const calls_t &calls, int64_t batch, int nt) const {
        // an item: an image, or (flat) a call's images
        const bool flat = images_per_call > 0;
        const int64_t per_item = flat ? images_per_call : 1,
                      items = (batch + per_item - 1) / per_item;
        const int64_t row_bytes = (flat ? dst_image : dst_row) * 4;
        // one call per row (a single chunk) writing rows dst_row apart that
        // are that wide, and a tail vector's lanes past the row no more than
        // a row: they land in the next row of the block, nowhere further
        const int64_t width = calls.split.width, lanes = calls.split.lanes;
        const int64_t overflow = (lanes - width % lanes) % lanes;
        const int64_t back_to_back =
                !flat && calls.split.chunks() == 1 && dst_row == width && overflow <= width;
        const int64_t chunks = calls.split.chunks(), channels = bounds->back();
        for_images(dir, items, *bounds, nt, [&](int64_t item, int64_t r0, int64_t r1) {
            const int64_t b = item * per_item,
                          rows = flat ? std::min(per_item, batch - b) : n_out_rows;
            for (int64_t ch = 0; ch < chunks; ++ch) {
                const int64_t lane = calls.split.first_lane(ch);
                jit::width_statistics *taken =
                        statistics ? statistics + b * channels * chunks + ch : nullptr;
                const jit::spmm_width_call_params c{
                        values,
                        offsets,
                        groups->ptr.data(),
                        groups->n,
                        r0,
                        r1,
                        src + b * src_image_bytes + lane * elem_bytes,
                        rows,
                        dst + b * dst_image + lane,
                        dst_channel * 4,
                        row_bytes,
                        bias,
                        correction,
                        scale,
                        back_to_back,
                        taken,
                        static_cast<int64_t>(chunks * sizeof(*statistics))};
                (*calls.kernels[ch])(c);
            }
        });
    }
};

// ---- the plan both schemes share ------------------------------------------------

// What the f32 and s8 plans differ in, by the SpMM's entries: one per weight
// (f32) or one per word of input channels sharing a 4-byte position (s8: a
// quad, or a pair without VNNI: jit::s8_conv_word). element_bytes: the SDDMM's.
template <typename spmm_entries_t> struct width_scheme;
template <> struct width_scheme<entry_plan> {
    static constexpr sparse_dtype dt = sparse_dtype::f32;
    static constexpr int64_t element_bytes = 4;
    static int64_t spmm_per_position(jit::s8_word) { return 1; }
    static std::unique_ptr<entry_plan>
    entries(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &offset,
            int threads, jit::s8_word) {
        return std::make_unique<entry_plan>(m, offset, threads);
    }
};
template <> struct width_scheme<quad_plan> {
    static constexpr sparse_dtype dt = sparse_dtype::s8;
    static constexpr int64_t element_bytes = 1;
    static int64_t spmm_per_position(jit::s8_word word) { return jit::channels_per_word(word); }
    static std::unique_ptr<quad_plan>
    entries(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &offset,
            int threads, jit::s8_word word) {
        return std::make_unique<quad_plan>(m, offset, threads, jit::channels_per_word(word));
    }
};

// Kernels, planes, entries and groupings of one direction, built once per
// problem; the schemes' plans below add the execution.
template <typename spmm_entries_t> class jit_conv2d_width_plan : public jit_plan {
protected:
    using scheme = width_scheme<spmm_entries_t>;

    jit_conv2d_width_plan(const problem &p, cpu_isa isa)
        : jit_plan(p), w_(p.conv),
          word_(scheme::dt == sparse_dtype::s8 ? jit::s8_conv_word(isa) : jit::s8_word::quad) {
        const int threads = p.num_threads;
        const int64_t per_position = scheme::spmm_per_position(word_),
                      bytes = scheme::element_bytes, spmm_bytes = 4 / per_position;
        const conv_width &w = w_;
        const bool aligned = aligned_sources(isa);
        switch (p.dir) {
            case direction::forward: {
                width_split split = spmm_split(isa, scheme::dt, w_.l.out_w, word_);
                const int64_t words = (w_.l.in_c + per_position - 1) / per_position;
                // (not where the AVX-512 kernels take a forward's batch
                // statistics in their epilogue, which the flat rows' dropped
                // lanes would spoil: rows that wide lose few lanes anyway)
                const bool statistics = aligned && w_.l.out_pixels() >= statistics_min_plane;
                if (w_.l.sh == 1 && w_.l.sw == 1 && !statistics) {
                    const width_split flat = flat_spmm_split(isa, scheme::dt, word_, w_.l.out_h,
                                                             w_.l.out_w, w_.l.wp);
                    const width_plane plane = w_.flat_x_plane(flat.read_lanes());
                    if (flat.width != 0 && flat_images_fit(words * plane.size() * 4))
                        flat_spmm_ = true, split = flat, plane_ = plane;
                }
                if (!flat_spmm_)
                    plane_ = aligned ? w_.x_plane(w_.l.out_w, split.lanes)
                                     : w_.x_plane(split.read_lanes());
                const width_plane plane = plane_;
                const sparse_rows m = w_.forward_rows(p.pattern);
                const auto offset =
                        plane_offset(w_, plane.size(), per_position, 4,
                                     [&w, plane](int64_t tap) { return w.x_tap(plane, tap); });
                // flat rows start a tap anywhere in a vector: no runs by shift
                const source_runs runs = aligned && !flat_spmm_
                                                 ? runs_of(m, offset, split.lanes * 4, per_position)
                                                 : source_runs{};
                // flat: the kernels' rows are images, a block of them reads
                // their planes whole
                fwd_ = flat_spmm_ ? spmm_calls(isa, scheme::dt, split, word_, 0,
                                               words * plane.size() * 4, 0)
                                  : spmm_calls(isa, scheme::dt, split, word_, w_.l.out_h,
                                               w_.l.sh * plane.row_len() * 4, runs.shifts);
                width_entries<scheme>(w_, m, offset, runs, w_.l.in_c,
                                      flat_spmm_ ? fwd_.kernels.front()->params().n_rows
                                                 : block_rows(fwd_, w_.l.sh, x_span()),
                                      (flat_spmm_ ? plane.size() : plane.row_len()) * spmm_bytes,
                                      threads, word_, spmm_, groups_);
                break;
            }
            case direction::backward_data:
                plane_ = make_phases(w_, isa, scheme::dt, word_, phases_);
                choose_flat_backward_data(isa, per_position); // the one phase's, at stride 1
                for (auto &f : phases_) {
                    const conv_layout::phase ph = f.phase;
                    const width_plane plane = plane_;
                    const sparse_rows m = w_.backward_data_rows(p.pattern, ph);
                    const auto offset = plane_offset(
                            w_, plane.size(), per_position, 4,
                            [&w, plane, ph](int64_t tap) { return w.dy_tap(plane, ph, tap); });
                    const source_runs runs =
                            aligned && !flat_spmm_
                                    ? runs_of(m, offset, f.calls.split.lanes * 4, per_position)
                                    : source_runs{};
                    const int64_t words = (w_.l.out_c + per_position - 1) / per_position;
                    f.calls = flat_spmm_ ? spmm_calls(isa, scheme::dt, f.calls.split, word_, 0,
                                                      words * plane.size() * 4, 0)
                                         : spmm_calls(isa, scheme::dt, f.calls.split, word_, ph.n_h,
                                                      plane.row_len() * 4, runs.shifts);
                    width_entries<scheme>(w_, m, offset, runs, w_.l.out_c,
                                          flat_spmm_ ? f.calls.kernels.front()->params().n_rows
                                                     : block_rows(f.calls, 1, dy_span()),
                                          (flat_spmm_ ? plane.size() : plane.row_len())
                                                  * spmm_bytes,
                                          threads, word_, f.entries, f.groups);
                }
                break;
            case direction::backward_weights: {
                const width_split flat = flat_sddmm_split(isa);
                flat_ = flat.width != 0;
                if (flat_) {
                    // a whole image is one output row: its rows at the
                    // padded width back to back (dY too, zeros up to the
                    // vectors' width: no tail to mask), a block of images
                    plane_ = w_.flat_x_plane(flat.read_lanes());
                    bwd_ = sddmm_calls(isa, scheme::dt, flat, 0, w_.l.in_c * plane_.size() * bytes);
                }
                const sparse_rows m = w_.forward_rows(p.pattern);
                auto offset_in = [&](const width_plane &plane) {
                    return plane_offset(w_, plane.size(), 1, bytes,
                                        [&w, plane](int64_t tap) { return w.x_tap(plane, tap); });
                };
                source_runs runs;
                if (!flat_) {
                    const width_split split = sddmm_split(isa, scheme::dt, w_.l.out_w);
                    // aligned sources where a row is one call whose last
                    // vector's real lanes stay in it at every shift (the
                    // kernel moves dY's lanes instead of x's: no instruction
                    // per entry)
                    const int tail = split.tail(0); // 0 unless one chunk
                    if (aligned_sddmm_sources(scheme::dt) && split.chunks() == 1 && tail != 0) {
                        const width_plane rows = w_.x_plane(w_.l.out_w, split.lanes);
                        const source_runs fit = runs_of(m, offset_in(rows), split.lanes * bytes);
                        if (tail + fit.shifts - 1 <= split.lanes) plane_ = rows, runs = fit;
                    }
                    if (runs.shifts == 0) plane_ = w_.x_plane(split.read_lanes());
                    bwd_ = sddmm_calls(isa, scheme::dt, split, w_.l.out_h,
                                       w_.l.sh * plane_.row_len() * bytes, runs.shifts);
                }
                // x a block reads per channel: flat_, its images' planes
                const int64_t rows_touched = flat_ ? bwd_.kernels.front()->params().n_rows
                                                   : block_rows(bwd_, w_.l.sh, x_span());
                const int64_t row_bytes = (flat_ ? plane_.size() : plane_.row_len()) * bytes;
                width_entries<width_scheme<entry_plan>>(w_, m, offset_in(plane_), runs, w_.l.in_c,
                                                        rows_touched, row_bytes, threads, word_,
                                                        sddmm_, groups_);
                break;
            }
        }
    }

    const conv_layout &l() const { return w_.l; }
    int64_t x_span() const { return (l().kh - 1) * l().dh + 1; }

    // The split of backward-weights' flat rows (flat_: an image one output
    // row) at stride 1, or a split of width 0: always in s8, whose byte lanes
    // make a vector 4x f32's columns (C3's 14 columns filled 22 % of one);
    // in f32 where the flat rows need at most 4/5 of the rows' vectors, as
    // the flat SpMM (7 columns on AVX-512: 4 vectors an image, not 7), and
    // the images fit the kernels' row step.
    width_split flat_sddmm_split(cpu_isa isa) const {
        if (l().sh != 1 || l().sw != 1) return {};
        const bool s8 = scheme::dt == sparse_dtype::s8;
        const width_split flat =
                flat_split([&](int64_t width) { return sddmm_split(isa, scheme::dt, width); },
                           l().out_h, l().out_w, l().wp, s8);
        if (s8 || flat.width == 0) return flat;
        const int64_t image_bytes = l().in_c * w_.flat_x_plane(flat.read_lanes()).size() * 4;
        return flat_images_fit(image_bytes) ? flat : width_split{};
    }

    // Backward-data at stride 1 (one phase) on the flat SpMM, where it pays
    // (flat_spmm_split) and every real lane of a row reads inside its dY row
    // (the lanes past them, which read on into the next row, are dropped):
    // sets flat_spmm_, the flat dY plane and the phase's split.
    void choose_flat_backward_data(cpu_isa isa, int64_t per_position) {
        if (l().sh != 1 || l().sw != 1 || phases_.size() != 1) return;
        phase_plan<spmm_entries_t> &f = phases_.front();
        if (f.phase.n_h != l().in_h || f.phase.n_w != l().in_w) return; // diff_src whole
        const width_split flat =
                flat_spmm_split(isa, scheme::dt, word_, f.phase.n_h, f.phase.n_w, l().owp);
        if (flat.width == 0) return;
        for (int64_t kw = 0; kw < l().kw; ++kw) {
            int64_t mw = 0;
            conv_layout::tap_in_phase(f.phase.pw, kw, l().dw, l().sw, mw);
            if (f.phase.qw0 + mw + l().dy_pad.left + f.phase.n_w > l().owp) return;
        }
        const width_plane plane = w_.flat_dy_plane(f.phase, flat.read_lanes());
        const int64_t words = (l().out_c + per_position - 1) / per_position;
        if (!flat_images_fit(words * plane.size() * 4)) return;
        flat_spmm_ = true;
        plane_ = plane;
        f.calls.split = flat;
    }
    // The flat SpMM's output of `planes` planes of n_h x n_w into `out`,
    // through scratch slot 9 (its rows at the source's padded width).
    template <typename run_t>
    void run_flat(const tensors &t, runtime::scratchpad &sp, spmm_run run, const run_t &calls,
                  int64_t channels, int64_t n_h, int64_t n_w, int64_t row_len, float *out) const {
        const int64_t stride = calls.split.read_lanes();
        float *flat = sp.get<float>(9, t.batch * channels * stride);
        run.dst = flat;
        run.dst_image = channels * stride;
        run.dst_channel = stride;
        run.images_per_call = calls.kernels.front()->params().n_rows;
        run(p_.dir, calls, t.batch, p_.num_threads);
        flat_runs[static_cast<int>(p_.dir)].fetch_add(1, std::memory_order_relaxed);
        unflatten_width_rows(flat, t.batch * channels, n_h, n_w, row_len, stride, out,
                             p_.num_threads);
    }

    // The batch statistics of the forward's dst, taken by the AVX-512
    // kernels in their epilogue (tensors::dst_statistics; width_abi.hpp):
    // prepare_statistics points `run` at scratch `slot` for them when they
    // are wanted and the kernels take them; finish_statistics combines them.
    // Only on planes of 512 outputs or more: the work per image and channel
    // (a call's vectors, then their combination) is the same for any plane,
    // and on small ones it costs more than the pass it saves (main job,
    // convolution + BatchNorm forward: 128x24x28x28 -0.18 ms, 128x48x14x14
    // +0.05, 128x96x7x7 +0.3).
    static constexpr int64_t statistics_min_plane = 512;
    bool kernels_take_statistics() const {
        return !flat_spmm_ && fwd_.kernels.front()->params().isa >= cpu_isa::avx512_core
               && l().out_pixels() >= statistics_min_plane;
    }
    void prepare_statistics(const tensors &t, runtime::scratchpad &sp, int slot,
                            spmm_run &run) const {
        if (t.dst_statistics && kernels_take_statistics())
            run.statistics =
                    sp.get<jit::width_statistics>(slot, t.batch * l().out_c * fwd_.split.chunks());
    }
    // The forward's kernels over the packed source x (image_bytes an image)
    // into t.dst, taking the batch statistics where asked (scratch `slot`).
    void run_forward(const tensors &t, runtime::scratchpad &sp, int slot, const void *values,
                     const void *x, int64_t image_bytes, const float *bias,
                     const int32_t *correction, const float *scale) const {
        spmm_run run{values,
                     spmm_->offsets.data(),
                     &groups_,
                     &spmm_->bounds,
                     static_cast<const uint8_t *>(x),
                     image_bytes,
                     4,
                     l().out_h,
                     t.dst,
                     l().out_c * l().out_pixels(),
                     l().out_pixels(),
                     l().out_w,
                     bias,
                     correction,
                     scale};
        if (flat_spmm_) {
            run_flat(t, sp, run, fwd_, l().out_c, l().out_h, l().out_w, l().wp, t.dst);
            return;
        }
        prepare_statistics(t, sp, slot, run);
        run(p_.dir, fwd_, t.batch, p_.num_threads);
        finish_statistics(t, run);
    }
    void finish_statistics(const tensors &t, const spmm_run &run) const {
        if (!run.statistics) return;
        const int64_t chunks = fwd_.split.chunks(), n = t.batch * l().out_c * chunks;
        std::vector<statistics_part> parts(static_cast<size_t>(n));
#pragma omp parallel for num_threads(p_.num_threads) schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t ch = i % chunks;
            const int tail = fwd_.split.tail(ch);
            const int64_t width = fwd_.split.chunk_vectors(ch) * fwd_.split.lanes
                                  - (tail != 0 ? fwd_.split.lanes - tail : 0);
            parts[static_cast<size_t>(i)] = part_of(run.statistics[i], l().out_h * width);
        }
        dst_statistics_request &out = *t.dst_statistics;
        channel_statistics_from_parts(parts.data(), t.batch, l().out_c, chunks, out.mean, out.var,
                                      out.range, p_.num_threads);
        out.written = true;
    }
    int64_t dy_span() const {
        return (l().kh - 1) * l().dh / l().sh + 1;
    }

    // Backward-data over the packed dY (`image_bytes` per image): per phase,
    // phase_values(phase) gives the kernels' values (f32 weights, or s8
    // words, filled for that phase), then its kernels run. At stride 1
    // across, a phase's rows are diff_src's; else the column phases of a row
    // phase go to scratch `slot` and one pass makes those rows of diff_src
    // whole (interleave_width_phases).
    template <typename values_t>
    void run_backward_data(const tensors &t, runtime::scratchpad &sp, int slot, const void *dy,
                           int64_t image_bytes, const float *zeros, const int32_t *correction,
                           const float *scale, values_t phase_values) const {
        const int64_t B = t.batch, ic = l().in_c, in_px = l().in_pixels();
        const int nt = p_.num_threads;
        // the kernels of phase f writing rows `row` floats apart, `channel`
        // a channel and `image` an image from `out`
        auto phase_run = [&](const phase_plan<spmm_entries_t> &f, float *out, int64_t image,
                             int64_t channel, int64_t row) {
            return spmm_run{phase_values(f),
                            f.entries->offsets.data(),
                            &f.groups,
                            &f.entries->bounds,
                            static_cast<const uint8_t *>(dy),
                            image_bytes,
                            4,
                            f.phase.n_h,
                            out,
                            image,
                            channel,
                            row,
                            zeros,
                            correction,
                            scale};
        };
        auto run_phase = [&](const phase_plan<spmm_entries_t> &f, float *out, int64_t image,
                             int64_t channel, int64_t row) {
            phase_run(f, out, image, channel, row)(p_.dir, f.calls, B, nt);
        };
        if (flat_spmm_) { // stride 1: the one phase is diff_src whole
            const auto &f = phases_.front();
            run_flat(t, sp, phase_run(f, nullptr, 0, 0, 0), f.calls, ic, f.phase.n_h, f.phase.n_w,
                     l().owp, t.diff_src);
            return;
        }
        if (l().sw == 1) {
            for (const auto &f : phases_)
                run_phase(f, t.diff_src + f.phase.ih0 * l().in_w + f.phase.iw0, ic * in_px, in_px,
                          l().sh * l().in_w);
            return;
        }
        int64_t rows = 0; // of the largest row phase
        for (const auto &f : phases_)
            rows = std::max(rows, f.phase.n_h);
        float *scratch = sp.get<float>(slot, B * ic * rows * l().in_w);
        std::vector<width_phase_rows> group;
        for (int64_t ph = 0; ph < l().sh; ++ph) {
            const conv_layout::phase *any = nullptr;
            float *at = scratch;
            for (const auto &f : phases_) {
                if (f.phase.ph != ph) continue;
                const int64_t plane = f.phase.n_h * f.phase.n_w;
                run_phase(f, at, ic * plane, plane, f.phase.n_w);
                group.push_back({at, f.phase.iw0, f.phase.n_w});
                at += B * ic * plane;
                any = &f.phase;
            }
            if (any)
                interleave_width_phases(group.data(), static_cast<int64_t>(group.size()), B, ic,
                                        any->n_h, l().in_h, l().in_w, any->ih0, l().sh, l().sw,
                                        t.diff_src, nt);
            group.clear();
        }
    }

    conv_width w_;
    // s8 backward-weights at stride 1: an image is one output row of the
    // SDDMM (a block holds images): lanes are never lost to a row narrower
    // than a vector (14 columns of a 64-byte vector), only to the padding
    bool flat_ = false;
    // The SpMM at stride 1 on rows narrower than a vector (forward or
    // backward-data; flat_spmm_split): an image is one output row of the
    // kernels, a block holds images, the output goes through a scratch of
    // flat rows (run_flat)
    bool flat_spmm_ = false;
    jit::s8_word word_; // s8 SpMM source words: quads, or pairs without VNNI
    width_plane plane_; // forward / backward-weights: x; backward-data: dY
    row_calls<jit::jit_spmm_width_kernel> fwd_;
    row_calls<jit::jit_sddmm_width_kernel> bwd_;
    std::unique_ptr<spmm_entries_t> spmm_;           // forward
    std::unique_ptr<entry_plan> sddmm_;              // backward-weights
    grouping groups_;                                // forward, backward-weights
    std::vector<phase_plan<spmm_entries_t>> phases_; // backward-data
};

// ---- f32 -----------------------------------------------------------------------

class jit_conv2d_width_f32_plan : public jit_conv2d_width_plan<entry_plan> {
public:
    jit_conv2d_width_f32_plan(const problem &p, cpu_isa isa) : jit_conv2d_width_plan(p, isa) {}

    // The packs of x (forward) and dY (backward-data) check them.
    bool checks_finite_input() const override { return true; }

private:
    const float *bias_or_zeros(const float *bias, int64_t n, float *scratch) const {
        if (bias) return bias;
        std::fill(scratch, scratch + n, 0.f);
        return scratch;
    }

    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, image = l().in_c * plane_.size();
        float *x = sp.get<float>(0, B * image);
        if (!pack_width_planes(t.src, B, l().in_c, l().in_h, l().in_w, l().x_pad, plane_, x, nt))
            return kernel::non_finite_input;
        run_forward(t, sp, 3, spmm_->values(t.weights, sp.get<float>(1, p_.pattern.nnz()), nt), x,
                    image * 4, bias_or_zeros(t.bias, l().out_c, sp.get<float>(2, l().out_c)),
                    nullptr, nullptr);
        return nullptr;
    }

    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, image = l().out_c * plane_.size();
        float *dy = sp.get<float>(0, B * image);
        if (!pack_width_planes(t.diff_dst, B, l().out_c, l().out_h, l().out_w, l().dy_pad, plane_,
                               dy, nt))
            return kernel::non_finite_input;
        const float *zeros = bias_or_zeros(nullptr, l().in_c, sp.get<float>(2, l().in_c));
        run_backward_data(t, sp, 3, dy, image * 4, zeros, nullptr, nullptr, [&](const auto &f) {
            return f.entries->values(t.weights, sp.get<float>(1, p_.pattern.nnz()), nt);
        });
        return nullptr;
    }

    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, image = l().in_c * plane_.size(), nnz = p_.pattern.nnz();
        const int64_t vl = bwd_.split.lanes;
        float *x = sp.get<float>(0, B * image);
        float *partial = sp.get<float>(1, nnz * vl);
        pack_width_planes(t.src, B, l().in_c, l().in_h, l().in_w, l().x_pad, plane_, x, nt);
        // dY as it is, or (flat_) in rows of the padded width, zeros past
        // each row's columns (the windows there add nothing) and past the
        // image up to the vectors' width
        const float *dy = t.diff_dst;
        int64_t channel = l().out_pixels(), row = l().out_w;
        if (flat_) {
            const width_plane rows{(bwd_.split.read_lanes() + l().wp - 1) / l().wp, 1, l().wp};
            float *flat = sp.get<float>(2, B * l().out_c * rows.size());
            pack_width_planes(t.diff_dst, B, l().out_c, l().out_h, l().out_w, spatial_pad{}, rows,
                              flat, nt);
            dy = flat;
            channel = rows.size();
        }
        const int64_t dy_image = l().out_c * channel;
        // The calls' output rows: each image's (flat_: the images), the dY
        // block moving per row by dy_step floats (x by the kernel's step).
        const int64_t n_rows = flat_ ? B : l().out_h, images = flat_ ? 1 : B;
        const int64_t dy_step = flat_ ? dy_image : row;
        if (flat_)
            flat_runs[static_cast<int>(direction::backward_weights)].fetch_add(
                    1, std::memory_order_relaxed);
        const entry_plan &e = *sddmm_;
        for_parts(p_.dir, e.bounds, nt, [&](int64_t r0, int64_t r1) {
            std::fill(partial + e.row_ptr[r0] * vl, partial + e.row_ptr[r1] * vl, 0.f);
            for (int64_t b = 0; b < images; ++b)
                for (int64_t ch = 0; ch < bwd_.split.chunks(); ++ch) {
                    const int64_t lane = bwd_.split.first_lane(ch);
                    const jit::sddmm_width_call_params c{e.offsets.data(),
                                                         groups_.ptr.data(),
                                                         groups_.n,
                                                         r0,
                                                         r1,
                                                         x + b * image + lane,
                                                         dy + b * dy_image + lane,
                                                         channel * 4,
                                                         dy_step * 4,
                                                         n_rows,
                                                         partial};
                    (*bwd_.kernels[ch])(c);
                }
            for (int64_t i = e.row_ptr[r0]; i < e.row_ptr[r1]; ++i) {
                float s = 0.f;
                for (int64_t k = 0; k < vl; ++k)
                    s += partial[i * vl + k];
                t.diff_weights[e.value_index[i]] = s;
            }
        });
        if (t.diff_bias) bias_grad(t.diff_dst, t.diff_bias, B, l().out_c, l().out_pixels(), nt);
        return nullptr;
    }
};

// ---- s8 ------------------------------------------------------------------------

class jit_conv2d_width_s8_plan : public jit_conv2d_width_plan<quad_plan> {
public:
    // The SDDMM's int32 lanes each add at most 4 * 255 * 128 per dY vector:
    // partial sums are moved into int64 before this many vectors.
    static constexpr int64_t max_lane_steps = std::numeric_limits<int32_t>::max() / (4 * 255 * 128);

    jit_conv2d_width_s8_plan(const problem &p, cpu_isa isa) : jit_conv2d_width_plan(p, isa) {
        if (p.dir == direction::backward_weights)
            tap_of_entry_ = window_taps_of_entries(w_.l, p.pattern, *sddmm_);
    }

    // Backward-data reads dY only through s8::quantize_dx_gradient.
    bool quantizes_diff_dst_only() const override { return p_.dir == direction::backward_data; }
    // Backward-weights reads G1 as plain int8: in a fused backward,
    // backward-data makes it in its own pass over dY.
    shared_gradient::form shared_form_read() const override {
        return p_.dir == direction::backward_weights ? shared_gradient::form::s8_plain_dy_q
                                                     : shared_gradient::form::none;
    }

private:
    // The pass that packs the SpMM source in this plan's words.
    pack_width_quads_fn *pack_words() const {
        return word_ == jit::s8_word::pair ? pack_width_pairs : pack_width_quads;
    }

    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, nnz = p_.pattern.nnz(), oc = l().out_c;
        const int64_t cpw = jit::channels_per_word(word_);
        const int64_t image = (l().in_c + cpw - 1) / cpw * plane_.size();
        const int64_t src_elems = B * l().in_c * l().in_pixels();
        const s8::workspace_view &ws = t.workspace; // training: Xq, Wq kept for the backward
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, oc);
        auto *words = sp.get<uint32_t>(2, spmm_->quads());
        auto *correction = sp.get<int32_t>(3, oc);
        auto *x = sp.get<uint32_t>(4, B * image);
        auto *row_scale = sp.get<float>(5, oc);
        auto *zeros = sp.get<float>(6, oc);
        auto *local_xq = t.workspace ? nullptr : sp.get<int8_t>(7, src_elems);
        quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        spmm_->fill(wq, words, correction, nt);
        int8_t *xq = t.workspace ? ws.src_q() : local_xq;
        const float sx = s8::quantized_src(t, src_elems, xq, nt);
        if (t.workspace) ws.set_src_scale(sx);
        pack_words()(xq, B, l().in_c, l().in_h, l().in_w, l().x_pad, plane_, x, nt);
        for (int64_t o = 0; o < oc; ++o)
            row_scale[o] = s8::forward_scale(sx, w_scale[o]);
        std::fill(zeros, zeros + oc, 0.f);
        run_forward(t, sp, 8, words, x, image * 4, t.bias ? t.bias : zeros, correction, row_scale);
        return nullptr;
    }

    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, oc = l().out_c, ic = l().in_c;
        const int64_t cpw = jit::channels_per_word(word_);
        const int64_t image = (oc + cpw - 1) / cpw * plane_.size();
        int64_t max_quads = 1;
        for (const auto &f : phases_)
            max_quads = std::max(max_quads, f.entries->quads());
        const s8::workspace_view &ws = t.workspace; // the forward's Wq and scales
        const int8_t *wq = ws.weights_q();
        const float *w_scale = ws.weight_scale();
        auto *g2 = sp.get<int8_t>(2, B * oc * l().out_pixels());
        auto *dy = sp.get<uint32_t>(3, B * image);
        auto *words = sp.get<uint32_t>(4, max_quads);
        auto *correction = sp.get<int32_t>(5, ic);
        auto *scale = sp.get<float>(6, ic);
        auto *zeros = sp.get<float>(7, ic);
        const float sg2 = s8::quantize_dx_gradient(t, B * oc * l().out_pixels(), w_scale, oc,
                                                   l().out_pixels(), g2, nt);
        pack_words()(g2, B, oc, l().out_h, l().out_w, l().dy_pad, plane_, dy, nt);
        std::fill(scale, scale + ic, sg2);
        std::fill(zeros, zeros + ic, 0.f);
        run_backward_data(t, sp, 8, dy, image * 4, zeros, correction, scale, [&](const auto &f) {
            f.entries->fill(wq, words, correction, nt);
            return words;
        });
        return nullptr;
    }

    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, nnz = p_.pattern.nnz(), oc = l().out_c;
        const int64_t image = l().in_c * plane_.size(), vl = bwd_.split.lanes / 4;
        // dY rows: of the vectors' width, or (flat_) of the padded width,
        // an image's channel padded to the vectors' width
        const int64_t row_bytes = flat_ ? l().wp : bwd_.split.read_lanes();
        const int64_t channel_bytes = flat_ ? bwd_.split.read_lanes() : l().out_h * row_bytes;
        const int64_t dy_image = oc * channel_bytes;
        const int64_t taps = l().in_c * l().kh * l().kw;
        const s8::workspace_view &ws = t.workspace;
        const int8_t *xq = ws.plain_src_q();
        auto *g1_scratch = sp.get<int8_t>(0, B * oc * l().out_pixels());
        auto *dy = sp.get<uint8_t>(1, B * dy_image);
        auto *x = sp.get<int8_t>(2, B * image);
        auto *partial = sp.get<int32_t>(3, nnz * vl);
        auto *acc = sp.get<int64_t>(4, nnz);
        auto *plane_sum = sp.get<int32_t>(5, l().in_c * l().in_pixels());
        auto *window_sum = sp.get<int64_t>(6, taps);
        const auto [g1, sg1] =
                s8::quantize_dw_gradient(t, B * oc * l().out_pixels(), oc, g1_scratch, nt);
        pack_width_dy_u8(g1, B, oc, l().out_h, l().out_w, row_bytes, channel_bytes, dy, nt);
        pack_width_planes(xq, B, l().in_c, l().in_h, l().in_w, l().x_pad, plane_, x, nt);
        column_sums_s8(xq, B, l().in_c * l().in_pixels(), plane_sum, nt);
        conv_window_sums(l(), plane_sum, window_sum, nt);
        // The calls' output rows: each image's (flat_: the images), the x
        // and dY blocks moving per row by x_step and dy_step bytes.
        const int64_t rows = flat_ ? B : l().out_h, images = flat_ ? 1 : B;
        const int64_t x_step = flat_ ? image : l().sh * plane_.row_len();
        const int64_t dy_step = flat_ ? dy_image : row_bytes;
        // int32 lanes take at most max_lane_steps vectors: output rows per
        // call, and calls per flush into int64, are bounded by it.
        const int64_t vectors = bwd_.split.vectors;
        const int64_t rows_per_call = std::max<int64_t>(1, max_lane_steps / vectors);
        const entry_plan &e = *sddmm_;
        for_parts(p_.dir, e.bounds, nt, [&](int64_t r0, int64_t r1) {
            const int64_t i0 = e.row_ptr[r0], i1 = e.row_ptr[r1];
            std::fill(partial + i0 * vl, partial + i1 * vl, 0);
            std::fill(acc + i0, acc + i1, int64_t(0));
            auto flush = [&] {
                for (int64_t i = i0; i < i1; ++i) {
                    int64_t s = 0;
                    for (int64_t k = 0; k < vl; ++k)
                        s += partial[i * vl + k];
                    acc[i] += s;
                }
                std::fill(partial + i0 * vl, partial + i1 * vl, 0);
            };
            int64_t steps = 0;
            for (int64_t b = 0; b < images; ++b)
                for (int64_t a0 = 0; a0 < rows; a0 += rows_per_call) {
                    const int64_t n = std::min(rows_per_call, rows - a0);
                    if (steps + n * vectors > max_lane_steps) {
                        flush();
                        steps = 0;
                    }
                    steps += n * vectors;
                    for (int64_t ch = 0; ch < bwd_.split.chunks(); ++ch) {
                        const int64_t lane = bwd_.split.first_lane(ch);
                        const jit::sddmm_width_call_params c{e.offsets.data(),
                                                             groups_.ptr.data(),
                                                             groups_.n,
                                                             r0,
                                                             r1,
                                                             x + b * image + a0 * x_step + lane,
                                                             dy + b * dy_image + a0 * dy_step
                                                                     + lane,
                                                             channel_bytes,
                                                             dy_step,
                                                             n,
                                                             partial};
                        (*bwd_.kernels[ch])(c);
                    }
                }
            flush();
        });
        const float scale = s8::backward_weights_scale(sg1, ws.src_scale());
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < nnz; ++i)
            t.diff_weights[e.value_index[i]] =
                    static_cast<float>(acc[i] - 128 * window_sum[tap_of_entry_[i]]) * scale;
        if (t.diff_bias) bias_grad(t.diff_dst, t.diff_bias, B, oc, l().out_pixels(), nt);
        return nullptr;
    }

    std::vector<int64_t> tap_of_entry_; // backward-weights, per kernel entry
};

// ---- implementations ---------------------------------------------------------------

std::string width_refusal(const problem &p, quant_scheme scheme, cpu_isa isa) {
    std::string why = conv_isa_refusal(p, scheme, isa, conv_vectorization::output_width);
    if (!why.empty()) return why;
    const conv_width w(p.conv);
    const int64_t lanes = jit::vector_lanes(isa);
    const bool s8 = scheme == quant_scheme::s8;
    // Every entry offset of every direction fits 32 bits.
    const int64_t fwd_lanes = (w.l.out_w + lanes - 1) / lanes * lanes;
    const int64_t sddmm_lanes =
            s8 ? (w.l.out_w + 4 * lanes - 1) / (4 * lanes) * 4 * lanes : fwd_lanes;
    // aligned sources: rows of whole vectors holding the real lanes
    const bool aligned = aligned_sources(isa);
    const int64_t align = aligned ? lanes : 1;
    std::vector<int64_t> phase_lanes;
    for (const auto &f : w.l.phases)
        phase_lanes.push_back(aligned ? f.n_w : (f.n_w + lanes - 1) / lanes * lanes);
    // s8 SpMM planes hold a word of channels (pairs: 2, quads: 4) each
    const int64_t cpw = s8 ? jit::channels_per_word(jit::s8_conv_word(isa)) : 1;
    const int64_t x_chans = (w.l.in_c + cpw - 1) / cpw, dy_chans = (w.l.out_c + cpw - 1) / cpw;
    const int64_t biggest =
            std::max({x_chans * w.x_plane(aligned ? w.l.out_w : fwd_lanes, align).size() * 4,
                      w.l.in_c * w.x_plane(sddmm_lanes).size() * (s8 ? 1 : 4),
                      s8 ? 0 : w.l.in_c * w.x_plane(w.l.out_w, lanes).size() * 4, // aligned
                      dy_chans * w.dy_plane(phase_lanes, align).size() * 4});
    if (biggest > std::numeric_limits<int32_t>::max())
        return "an image's padded planes exceed the 32-bit entry offsets";
    if (s8) {
        const int64_t terms = std::max(w.l.icg, w.l.ocg) * w.l.kh * w.l.kw;
        if (terms > int32_safe_reduction_length)
            return "a reduction of " + std::to_string(terms) + " terms could overflow int32";
    }
    return "";
}

} // namespace

int64_t flat_width_runs_for_testing(direction dir) {
    return flat_runs[static_cast<int>(dir)].load(std::memory_order_relaxed);
}

implementation jit_conv2d_width(quant_scheme scheme, cpu_isa isa) {
    const char *name = jit_implementation_name(isa, "width");
    return {name,
            [scheme, isa](const problem &p) { return width_refusal(p, scheme, isa); },
            [name, scheme, isa](const problem &p) -> std::shared_ptr<const kernel> {
                return cached_plan(name, isa, p, [&]() -> std::shared_ptr<const kernel> {
                    if (scheme == quant_scheme::s8)
                        return std::make_shared<const jit_conv2d_width_s8_plan>(p, isa);
                    return std::make_shared<const jit_conv2d_width_f32_plan>(p, isa);
                });
            },
            false,
            op_kind::conv2d,
            {}};
}

} // namespace qsp::detail
