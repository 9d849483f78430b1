#include "primitives/sparse_jit/spmm_plan.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include <unistd.h>

#include "jit/tile_abi.hpp"
#include "primitives/passes/quantize.hpp"

namespace qsp::detail {

namespace {

int32_t checked_offset(int64_t bytes) {
    // why_not() refuses problems whose tiles exceed the 32-bit offsets; this
    // guards the plans against a mistake there.
    if (bytes < 0 || bytes > std::numeric_limits<int32_t>::max())
        throw std::logic_error("sparse JIT plan: source offset " + std::to_string(bytes)
                               + " outside the 32-bit range");
    return static_cast<int32_t>(bytes);
}

} // namespace

value_indices::value_indices(const std::vector<int64_t> &index, identity keep_identity) {
    const int64_t n = static_cast<int64_t>(index.size());
    if (keep_identity == identity::dropped) {
        int64_t e = 0;
        while (e < n && index[static_cast<size_t>(e)] == e)
            ++e;
        if (e == n) return;
    }
    const bool fits = std::all_of(index.begin(), index.end(), [](int64_t v) {
        return v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
    });
    if (fits)
        narrow_.assign(index.begin(), index.end());
    else
        wide_ = index;
}

sparse_rows csr_rows(const int64_t *row_ptr, const int32_t *col_idx, int64_t rows) {
    sparse_rows m;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e)
            m.add(col_idx[e], e);
        m.end_row();
    }
    return m;
}

sparse_rows transposed_rows(const int64_t *row_ptr, const int32_t *col_idx, int64_t rows,
                            int64_t cols) {
    sparse_rows m;
    m.rows = cols;
    const int64_t nnz = row_ptr[rows];
    m.row_ptr.assign(static_cast<size_t>(cols) + 1, 0);
    for (int64_t e = 0; e < nnz; ++e)
        ++m.row_ptr[col_idx[e] + 1];
    for (int64_t c = 0; c < cols; ++c)
        m.row_ptr[c + 1] += m.row_ptr[c];
    m.key.resize(static_cast<size_t>(nnz));
    m.value_index.resize(static_cast<size_t>(nnz));
    std::vector<int64_t> next(m.row_ptr.begin(), m.row_ptr.end() - 1);
    for (int64_t r = 0; r < rows; ++r) // ascending r: keys ascend within a row of the transpose
        for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) {
            const int64_t slot = next[col_idx[e]]++;
            m.key[slot] = r;
            m.value_index[slot] = e;
        }
    return m;
}

sparse_rows rows_from_triples(int64_t rows, std::vector<std::array<int64_t, 3>> &triples) {
    std::sort(triples.begin(), triples.end());
    sparse_rows m;
    size_t t = 0;
    for (int64_t r = 0; r < rows; ++r) {
        for (; t < triples.size() && triples[t][0] == r; ++t)
            m.add(triples[t][1], triples[t][2]);
        m.end_row();
    }
    return m;
}

entry_plan::entry_plan(const sparse_rows &m, const std::function<int64_t(int64_t, int64_t)> &offset,
                       int parts)
    : rows(m.rows), row_ptr(m.row_ptr) {
    offsets.assign(static_cast<size_t>(m.entries()) + jit::sddmm_offset_padding, 0);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e)
            offsets[e] = checked_offset(offset(r, m.key[e]));
    value_index = value_indices(m.value_index, value_indices::identity::dropped);
    bounds = balance_rows(row_ptr.data(), rows, std::max(1, parts));
}

const float *entry_plan::values(const float *csr_values, float *scratch, int num_threads) const {
    if (value_index.in_order()) return csr_values;
    const int64_t n = row_ptr.back();
    if (const int32_t *index = value_index.narrow()) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t s = 0; s < n; ++s)
            scratch[s] = csr_values[index[s]];
    } else {
        const int64_t *wide = value_index.wide();
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t s = 0; s < n; ++s)
            scratch[s] = csr_values[wide[s]];
    }
    return scratch;
}

namespace {

// The offsets in `order` (each index once, else a planning mistake).
std::vector<int32_t> reordered(const std::vector<int32_t> &offsets, int64_t n,
                               const std::vector<int64_t> &order) {
    std::vector<char> seen(static_cast<size_t>(n), 0);
    if (static_cast<int64_t>(order.size()) != n)
        throw std::logic_error("sparse JIT plan: reorder needs every item once");
    std::vector<int32_t> out(offsets.size(), 0); // padding past n stays zero
    for (int64_t slot = 0; slot < n; ++slot) {
        const int64_t item = order[slot];
        if (item < 0 || item >= n || seen[item])
            throw std::logic_error("sparse JIT plan: reorder needs every item once");
        seen[item] = 1;
        out[slot] = offsets[item];
    }
    return out;
}

} // namespace

void entry_plan::reorder_offsets(const std::vector<int64_t> &order) {
    offsets = reordered(offsets, row_ptr.back(), order);
}

void quad_plan::reorder_offsets(const std::vector<int64_t> &order) {
    offsets = reordered(offsets, quads(), order);
}

quad_plan::quad_plan(const sparse_rows &m,
                     const std::function<int64_t(int64_t, int64_t)> &quad_offset, int parts,
                     int channels_per_word_)
    : rows(m.rows), channels_per_word(channels_per_word_), entry_ptr(m.row_ptr),
      value_index(m.value_index, value_indices::identity::dropped) {
    if (channels_per_word != 4 && channels_per_word != 2)
        throw std::logic_error("quad plan: a word holds 4 or 2 channels");
    const int64_t n = m.entries();
    quad_ptr.assign(static_cast<size_t>(rows) + 1, 0);
    std::vector<int64_t> quad_of(static_cast<size_t>(n)); // item_of(), while it is built
    slot_of.resize(static_cast<size_t>(n));
    std::vector<int64_t> row_words; // a row's words in order, each once
    for (int64_t r = 0; r < rows; ++r) {
        int64_t last = -1;
        row_words.clear();
        for (int64_t l = entry_ptr[r]; l < entry_ptr[r + 1]; ++l) {
            const int64_t quad = m.key[l] / channels_per_word;
            if (quad != last) {
                last = quad;
                row_words.push_back(quad);
                offsets.push_back(checked_offset(quad_offset(r, quad)));
            }
            quad_of[l] = static_cast<int64_t>(offsets.size()) - 1;
            slot_of[l] = static_cast<uint8_t>(m.key[l] % channels_per_word)
                         | (l == entry_ptr[r] || quad_of[l] != quad_of[l - 1] ? new_word : 0);
        }
        // a word's entries are consecutive (keys ascend within a row, or
        // within each of its shift runs: split_runs_by_shift)
        std::sort(row_words.begin(), row_words.end());
        if (std::adjacent_find(row_words.begin(), row_words.end()) != row_words.end())
            throw std::logic_error("quad plan: a word's entries must be consecutive in a row");
        quad_ptr[r + 1] = static_cast<int64_t>(offsets.size());
    }
    offsets.shrink_to_fit(); // grown by push_back: up to twice its size held
    bounds = balance_rows(quad_ptr.data(), rows, std::max(1, parts));
    if (channels_per_word == 4) {
        const int64_t blocks = (quads() * 4 + 15) / 16;
        byte_masks.assign(static_cast<size_t>(blocks), 0);
        group_entry.assign(
                static_cast<size_t>((blocks + quad_word_group - 1) / quad_word_group) + 1, 0);
        for (int64_t l = 0; l < n; ++l) {
            const int64_t byte = quad_of[l] * 4 + (slot_of[l] & ~new_word);
            byte_masks[byte / 16] |= static_cast<uint16_t>(1u << (byte % 16));
            ++group_entry[byte / (16 * quad_word_group) + 1];
        }
        for (size_t g = 1; g < group_entry.size(); ++g) // counts -> first entries
            group_entry[g] += group_entry[g - 1];
    }
}

std::vector<int64_t> quad_plan::item_of() const {
    std::vector<int64_t> item(slot_of.size());
    for (int64_t r = 0; r < rows; ++r) {
        int64_t q = quad_ptr[r] - 1;
        for (int64_t l = entry_ptr[r]; l < entry_ptr[r + 1]; ++l) {
            q += (slot_of[l] & new_word) != 0;
            item[l] = q;
        }
    }
    return item;
}

namespace {

// quad_plan::fill for one word width: each row's words built in a register
// and stored as they grow (entries ascend by word), no zeroing pass and no
// read-modify-write through quad_of (Linear L1's two fills were 7 % of an
// AVX2 int8 step).
template <int channels_per_word, typename index_of_t>
void fill_words(const quad_plan &p, const int8_t *wq, uint32_t *words, int32_t *correction,
                index_of_t index_of, int num_threads) {
    constexpr int slot_bits = 32 / channels_per_word;
    const int64_t *entry_ptr = p.entry_ptr.data(), *quad_ptr = p.quad_ptr.data();
    const uint8_t *slot_of = p.slot_of.data();
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
        int64_t q = quad_ptr[r] - 1;
        uint32_t word = 0;
        int32_t sum = 0;
        for (int64_t l = entry_ptr[r]; l < entry_ptr[r + 1]; ++l) {
            const uint8_t slot = slot_of[l];
            const bool starts = (slot & quad_plan::new_word) != 0;
            q += starts;
            word = starts ? 0 : word;
            const int8_t v = wq[index_of(l)];
            const uint32_t bits =
                    channels_per_word == 4
                            ? static_cast<uint32_t>(static_cast<uint8_t>(v))
                            : static_cast<uint32_t>(static_cast<uint16_t>(int16_t{v}));
            word |= bits << (slot_bits * (slot & ~quad_plan::new_word));
            words[q] = word;
            sum += v;
        }
        correction[r] = 128 * sum;
    }
}

template <int channels_per_word>
void fill_words(const quad_plan &p, const int8_t *wq, uint32_t *words, int32_t *correction,
                int num_threads) {
    if (p.value_index.in_order()) {
        fill_words<channels_per_word>(
                p, wq, words, correction, [](int64_t l) { return l; }, num_threads);
    } else if (const int32_t *index = p.value_index.narrow()) {
        fill_words<channels_per_word>(
                p, wq, words, correction, [index](int64_t l) { return index[l]; }, num_threads);
    } else {
        const int64_t *wide = p.value_index.wide();
        fill_words<channels_per_word>(
                p, wq, words, correction, [wide](int64_t l) { return wide[l]; }, num_threads);
    }
}

} // namespace

void quad_plan::fill(const int8_t *wq, uint32_t *words, int32_t *correction, int num_threads,
                     int8_t *gathered) const {
    const int32_t *narrow = value_index.narrow();
    if (channels_per_word == 4 && (value_index.in_order() || (gathered && narrow)))
        if (expand_quad_words_fn *expand = expand_quad_words_tier()) {
            const int8_t *values = wq;
            if (!value_index.in_order()) {
                const int64_t n = entries();
#pragma omp parallel for num_threads(num_threads) schedule(static)
                for (int64_t l = 0; l < n; ++l)
                    gathered[l] = wq[narrow[l]];
                values = gathered;
            }
            const quad_word_masks m{byte_masks.data(), static_cast<int64_t>(byte_masks.size()),
                                    quads() * 4,       group_entry.data(),
                                    entry_ptr.data(),  rows};
            expand(m, values, words, correction, num_threads);
            return;
        }
    if (channels_per_word == 4)
        fill_words<4>(*this, wq, words, correction, num_threads);
    else
        fill_words<2>(*this, wq, words, correction, num_threads);
}

namespace {

// Two thirds of this CPU's L1 data cache (measured best on a 48 KiB L1, and
// safe on 32 KiB ones); the rest holds weights, offsets and the sums that
// are stored and reloaded per group.
int64_t l1_budget() {
    static const int64_t budget = [] {
        const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        return (l1 > 0 ? l1 : 32 * 1024) * 2 / 3;
    }();
    return budget;
}

} // namespace

source_groups make_source_groups(const sparse_rows &m, const std::vector<int64_t> &item_ptr,
                                 const std::vector<int64_t> *item_of,
                                 const std::function<int64_t(int64_t)> &channel_of,
                                 int64_t channels, int64_t channel_bytes, int64_t align,
                                 int64_t min_items) {
    source_groups g;
    auto round_up = [align](int64_t v) { return (v + align - 1) / align * align; };
    const int64_t fit = std::max<int64_t>(align, l1_budget() / std::max<int64_t>(channel_bytes, 1)
                                                         / align * align);
    const int64_t items = item_ptr.back();
    const int64_t max_groups =
            std::max<int64_t>(1, items / std::max<int64_t>(m.rows, 1) / min_items);
    int64_t n = fit >= channels ? 1 : (channels + fit - 1) / fit;
    n = std::min(n, max_groups);
    g.size = std::min(std::max<int64_t>(channels, 1),
                      round_up((channels + n - 1) / n)); // equal groups
    g.n = (channels + g.size - 1) / g.size;
    g.n = std::max<int64_t>(g.n, 1);
    g.ptr.reserve(static_cast<size_t>(m.rows * (g.n + 1)));
    for (int64_t r = 0; r < m.rows; ++r) {
        int64_t l = m.row_ptr[r];
        for (int64_t grp = 0; grp < g.n; ++grp) {
            // keys ascend with the channel's group: the first entry of group >= grp
            while (l < m.row_ptr[r + 1] && channel_of(m.key[l]) / g.size < grp)
                ++l;
            g.ptr.push_back(l == m.row_ptr[r + 1] ? item_ptr[r + 1]
                                                  : (item_of ? (*item_of)[l] : l));
        }
        g.ptr.push_back(item_ptr[r + 1]);
    }
    return g;
}

shift_runs split_runs_by_shift(const sparse_rows &m, const source_groups &g, int64_t runs,
                               const std::function<int64_t(int64_t, int64_t)> &shift_of) {
    if (runs < 1 || g.runs != 1 || static_cast<int64_t>(g.ptr.size()) != m.rows * (g.n + 1))
        throw std::logic_error("sparse JIT plan: shift runs need one run per group of every row");
    shift_runs out;
    out.rows.rows = 0;
    out.rows.key.reserve(m.key.size());
    out.rows.value_index.reserve(m.value_index.size());
    out.groups = g;
    out.groups.runs = runs;
    out.groups.ptr.clear();
    out.groups.ptr.reserve(static_cast<size_t>(m.rows * (g.n * runs + 1)));
    std::vector<int64_t> shift; // of the group's entries, each taken once
    for (int64_t r = 0; r < m.rows; ++r) {
        for (int64_t grp = 0; grp < g.n; ++grp) {
            const int64_t begin = g.ptr[r * (g.n + 1) + grp], end = g.ptr[r * (g.n + 1) + grp + 1];
            shift.clear();
            for (int64_t l = begin; l < end; ++l) {
                shift.push_back(shift_of(r, m.key[l]));
                if (shift.back() < 0 || shift.back() >= runs)
                    throw std::logic_error("sparse JIT plan: an entry's shift is past the runs");
            }
            // a pass per run (at most a vector's lanes of them): stable
            for (int64_t s = 0; s < runs; ++s) {
                out.groups.ptr.push_back(out.rows.entries());
                for (int64_t l = begin; l < end; ++l)
                    if (shift[l - begin] == s) out.rows.add(m.key[l], m.value_index[l]);
            }
        }
        out.groups.ptr.push_back(out.rows.entries());
        out.rows.end_row();
    }
    return out;
}

entry_pair_plan::entry_pair_plan(const sparse_rows &m,
                                 const std::function<int64_t(int64_t, int64_t)> &offset,
                                 int64_t channels, int64_t channel_bytes, int64_t min_group_items,
                                 int parts)
    : rows(m.rows) {
    const source_groups g = make_source_groups(
            m, m.row_ptr, nullptr, [](int64_t key) { return key; }, channels, channel_bytes, 1,
            min_group_items);
    groups.n = g.n;
    groups.size = g.size;
    item_ptr.assign(static_cast<size_t>(rows) + 1, 0);
    groups.ptr.reserve(g.ptr.size());
    std::vector<int64_t> slot_values; // value_index, while it is built
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t grp = 0; grp < g.n; ++grp) {
            groups.ptr.push_back(items());
            const int64_t begin = g.ptr[r * (g.n + 1) + grp], end = g.ptr[r * (g.n + 1) + grp + 1];
            for (int64_t l = begin; l < end; l += 2) {
                const int64_t second = l + 1 < end ? l + 1 : l;
                offsets.push_back(checked_offset(offset(r, m.key[l])));
                offsets.push_back(checked_offset(offset(r, m.key[second])));
                slot_values.push_back(m.value_index[l]);
                slot_values.push_back(l + 1 < end ? m.value_index[l + 1] : -1);
            }
        }
        groups.ptr.push_back(items());
        item_ptr[r + 1] = items();
    }
    bounds = balance_rows(item_ptr.data(), rows, std::max(1, parts));
    offsets.shrink_to_fit(); // grown by push_back: up to twice its size held
    values = m.entries();
    // held even in order: the vector fill reads the int32 indices
    value_index = value_indices(slot_values, value_indices::identity::held);
}

void entry_pair_plan::reorder_offsets(const std::vector<int64_t> &order) {
    // the pairs' first and second offsets, each reordered like one item's
    std::vector<int32_t> first(static_cast<size_t>(items())), second(first.size());
    for (int64_t i = 0; i < items(); ++i) {
        first[i] = offsets[2 * i];
        second[i] = offsets[2 * i + 1];
    }
    first = reordered(first, items(), order);
    second = reordered(second, items(), order);
    for (int64_t s = 0; s < items(); ++s) {
        offsets[2 * s] = first[s];
        offsets[2 * s + 1] = second[s];
    }
}

void entry_pair_plan::fill(const int8_t *wq, uint32_t *words, int num_threads) const {
    const int64_t n = items();
    if (values >= 4 && value_index.narrow())
        if (entry_pair_words_fn *vector_fill = entry_pair_words_tier()) {
            vector_fill(value_index.narrow(), n, wq, values, words, num_threads);
            return;
        }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const int64_t a = value_index[2 * i], b = value_index[2 * i + 1];
        const int w0 = wq[a], w1 = b < 0 ? 0 : wq[b];
        words[i] = jit::entry_pair_word(w0, w1);
    }
}

std::vector<int64_t> balance_rows(const int64_t *row_ptr, int64_t rows, int parts) {
    constexpr int64_t row_cost = 8;
    const int64_t total = row_ptr[rows] + row_cost * rows;
    std::vector<int64_t> bounds{0};
    int64_t r = 0;
    for (int part = 1; part < parts; ++part) {
        const int64_t target = total * part / parts;
        while (r < rows && row_ptr[r] + row_cost * r < target)
            ++r;
        bounds.push_back(r);
    }
    bounds.push_back(rows);
    return bounds;
}

} // namespace qsp::detail
