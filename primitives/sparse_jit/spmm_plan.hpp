// A sparse matrix as the SpMM kernels walk it in one direction (Linear
// forward: the CSR; backward-data: its transpose; Conv2d: per output channel,
// or per input channel and stride phase), and the arrays the kernels take:
// per row its entries, per entry the byte offset of its source tile row and
// where its value comes from. Built once per layer and direction (a plan),
// so the per-layer pattern work happens at conversion, not per step.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

namespace qsp::detail {

// Entries per row, each with a key (its column in the direction's
// numbering, ascending within a row) and the index of its value in the
// layer's CSR values.
struct sparse_rows {
    int64_t rows = 0;
    std::vector<int64_t> row_ptr{0};
    std::vector<int64_t> key;
    std::vector<int64_t> value_index;

    void add(int64_t k, int64_t value) {
        key.push_back(k);
        value_index.push_back(value);
    }
    void end_row() {
        row_ptr.push_back(static_cast<int64_t>(key.size()));
        ++rows;
    }
    int64_t entries() const { return static_cast<int64_t>(key.size()); }
};

// Where a plan's slots (entries, or entry pairs' halves) take their values
// from among the layer's CSR values, each index held once: nothing where
// slot s takes value s and the plan may say so (a forward plan walks the
// CSR in its own order), else as int32 while every index fits (what the
// vector fills read; half the bytes of int64), as int64 past 2^31 values.
// -1: no value (an entry pair's missing second).
class value_indices {
public:
    enum class identity { dropped, held };
    value_indices() = default; // slot s takes value s
    value_indices(const std::vector<int64_t> &index, identity keep_identity);
    // Whether slot s takes value s (no index held).
    bool in_order() const { return narrow_.empty() && wide_.empty(); }
    int64_t operator[](int64_t slot) const {
        const auto s = static_cast<size_t>(slot);
        return !narrow_.empty() ? narrow_[s] : !wide_.empty() ? wide_[s] : slot;
    }
    // The indices as held: int32 (else null), int64 (else null).
    const int32_t *narrow() const { return narrow_.empty() ? nullptr : narrow_.data(); }
    const int64_t *wide() const { return wide_.empty() ? nullptr : wide_.data(); }
    size_t bytes() const {
        return narrow_.size() * sizeof(int32_t) + wide_.size() * sizeof(int64_t);
    }

private:
    std::vector<int32_t> narrow_;
    std::vector<int64_t> wide_;
};

// The CSR itself (row r, key = column) and its transpose (row = column,
// key = row, ascending).
sparse_rows csr_rows(const int64_t *row_ptr, const int32_t *col_idx, int64_t rows);
sparse_rows transposed_rows(const int64_t *row_ptr, const int32_t *col_idx, int64_t rows,
                            int64_t cols);
// `rows` rows from (row, key, value index) triples, which it sorts: keys
// ascending within a row (the convolutions' walks build them this way).
sparse_rows rows_from_triples(int64_t rows, std::vector<std::array<int64_t, 3>> &triples);

// One kernel entry per nonzero: the f32 SpMM, and every SDDMM.
struct entry_plan {
    int64_t rows = 0;
    std::vector<int64_t> row_ptr, bounds;
    std::vector<int32_t> offsets; // + sddmm_offset_padding readable entries
    value_indices value_index;    // in order: the CSR order itself
    // offset(row, key): byte offset of the entry's source row from the
    // pixel base; parts: the thread count (rows are split nnz-balanced).
    entry_plan(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &offset,
               int parts);
    // The values in kernel order (the CSR values when no permutation is needed).
    const float *values(const float *csr_values, float *scratch, int num_threads) const;
    // Source offsets into `order` (the offset of entry order[s] goes to slot
    // s, each entry once); values, rows and bounds keep the plan's order.
    void reorder_offsets(const std::vector<int64_t> &order);
};

// s8 SpMM arrays over "quads": consecutive entries of a row whose keys share
// key / 4 form one kernel entry (their 4 int8 weights packed in a dword, the
// source row holding the 4 matching bytes per batch element). With
// channels_per_word 2 (jit::s8_word::pair) the words are pairs instead:
// key / 2, two int16 weights in the dword, two u16 per batch element.
struct quad_plan {
    int64_t rows = 0;
    int channels_per_word = 4;
    std::vector<int64_t> quad_ptr, bounds; // kernel rows over quads
    std::vector<int32_t> offsets;          // per quad
    std::vector<int64_t> entry_ptr;
    value_indices value_index; // each entry's value (in order: a forward plan's)
    // the entry's slot in its word, | new_word for the first entry of a word
    std::vector<uint8_t> slot_of;
    static constexpr uint8_t new_word = 0x80;
    // The vector fill's view (4 channels a word): per 16 bytes of words the
    // bytes an entry fills, and per quad_word_group of them the first entry.
    std::vector<uint16_t> byte_masks;
    std::vector<int64_t> group_entry;
    // quad_offset(row, key / channels_per_word): byte offset of the word's
    // source row.
    quad_plan(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &quad_offset,
              int parts, int channels_per_word = 4);
    int64_t quads() const { return static_cast<int64_t>(offsets.size()); }
    // Each entry's quad (the kernel item its weight goes into), from
    // slot_of: what make_source_groups takes (not kept: 8 bytes an entry).
    std::vector<int64_t> item_of() const;
    // From this step's quantized weights: the quad dwords, and per row the
    // exact term 128 * sum(w) that the kernel's +128 shift adds.
    // gathered (or null): `entries` bytes of scratch where the values are
    // not in order, for the vector tier (AVX-512; null: the plan's loop).
    void fill(const int8_t *wq, uint32_t *words, int32_t *correction, int num_threads,
              int8_t *gathered = nullptr) const;
    int64_t entries() const { return static_cast<int64_t>(slot_of.size()); }
    // Source offsets into `order` (the offset of quad order[s] goes to slot
    // s, each quad once); words, rows and bounds keep the plan's order.
    void reorder_offsets(const std::vector<int64_t> &order);
};

// Source channels (columns of the pattern) taken in groups whose source
// rows fit in L1 while every destination row of a pass uses them; the
// kernels store a row's sums after each group and reload them in the next
// (jit/tile_abi.hpp, jit/width_abi.hpp: group_ptr).
struct source_groups {
    int64_t n = 1, size = 0; // groups of `size` channels (the last may hold fewer)
    // Per row: each group's first kernel item, then the row's end; with
    // runs > 1 (split_runs_by_shift) each group's `runs` runs' first items.
    std::vector<int64_t> ptr;
    int64_t runs = 1;
};

// s8 SpMM arrays over "entry pairs" (jit::s8_word::entry_pair): any two
// consecutive entries of a row's segment in one source group form one
// kernel item — two byte offsets of s8 source rows and their two weights in
// a dword (jit::entry_pair_word). A segment with an odd number of
// entries ends with an item whose second weight is 0 and whose second source
// is its first's. The sources are plain s8 tiles (x, no shift): the sums
// need no correction.
struct entry_pair_plan {
    int64_t rows = 0;
    std::vector<int64_t> item_ptr, bounds; // kernel rows over items
    std::vector<int32_t> offsets;          // per item: two byte offsets
    // Per item: its two entries' values (-1: none), slots 2i and 2i + 1.
    value_indices value_index;
    int64_t values = 0; // the layer's weights (the entries of m)
    // The source groups, ptr over items (a plan hands them to its runner).
    source_groups groups;
    // offset(row, key): byte offset of the entry's source row; the source
    // groups over `channels` channels of `channel_bytes` (key = channel).
    entry_pair_plan(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &offset,
                    int64_t channels, int64_t channel_bytes, int64_t min_group_items, int parts);
    int64_t items() const { return static_cast<int64_t>(offsets.size()) / 2; }
    // The item dwords from this step's quantized weights.
    void fill(const int8_t *wq, uint32_t *words, int num_threads) const;
    // Source offsets into `order` (the two offsets of item order[s] go to
    // slot s, each item once); words, rows and bounds keep the plan's order.
    void reorder_offsets(const std::vector<int64_t> &order);
};

// channel_bytes: the source bytes one channel occupies during a pass.
// Groups are a multiple of `align` channels (s8 quads: 4) and at most one per
// `min_items` kernel items of an average row (fewer items per group would not
// pay for the store and reload of the sums). rows m with their kernel items
// (f32: the entries; s8: quads, entry l in item item_of[l]) starting at
// item_ptr[r]; channel_of(key) is an entry's source channel, ascending with
// its key within a row.
source_groups make_source_groups(const sparse_rows &m, const std::vector<int64_t> &item_ptr,
                                 const std::vector<int64_t> *item_of,
                                 const std::function<int64_t(int64_t)> &channel_of,
                                 int64_t channels, int64_t channel_bytes, int64_t align = 4,
                                 int64_t min_items = 6);

// m's entries (one kernel item each) with every run of a row in one of
// groups g ordered by shift_of(row, key) in [0, runs), stably, and g's
// pointer split to match: per row, per group, the first entry of each
// shift's run, then the row's end (jit::sparse_kernel_params::shifts).
struct shift_runs {
    sparse_rows rows;
    source_groups groups;
};
shift_runs split_runs_by_shift(const sparse_rows &m, const source_groups &g, int64_t runs,
                               const std::function<int64_t(int64_t, int64_t)> &shift_of);

// Linear's SpMMs take a group only for segments of at least this many
// entries per row. Measured (L3, 4096 -> 4096, 90 %, f32 forward): 32
// L1-sized groups 7.4 ms, 8 groups 6.0 ms, one 3.8 ms: each row segment pays
// ~30 cycles at its loop exit (a mispredict on a random length) plus the
// store and reload of its sums, more than the L1 hits save when a segment
// holds a dozen entries of 4 multiply-adds. (Conv2d's width kernels do 16
// multiply-adds per entry and gain from groups: C3 38 -> 30 ms.)
constexpr int64_t linear_min_group_items = 256;

// Row boundaries for `parts` parts of about equal cost (entries + a per-row
// overhead): the partition of a plan's rows over threads. Each part's rows
// are written by one thread only: no barriers, no atomics, no private copies.
std::vector<int64_t> balance_rows(const int64_t *row_ptr, int64_t rows, int parts);

} // namespace qsp::detail
