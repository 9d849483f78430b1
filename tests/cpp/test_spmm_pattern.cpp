// The SpMM code specialised to a layer's pattern, below the primitives: the
// schedule (every item once, rows sorted by length, empty rows only where
// they must be zeroed) and the generated code against a scalar model, with
// exact and looped bodies (a small code budget), one and two source groups,
// every vector count, f32 and s8, on every tier the machine has.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "jit/jit_uni_spmm_pattern_kernel.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"
#include "primitives/sparse_jit/spmm_runner.hpp"
#include "qsparseprop/runtime.hpp"
#include "test_utils.hpp"

namespace qsp::test {

namespace {

using detail::source_groups;
using detail::spmm_schedule;

// rows with random lengths in [0, max_len] (some empty, some long), each
// split at a random point into `n_groups` (1 or 2) segments.
source_groups random_groups(int64_t rows, int64_t max_len, int64_t n_groups, std::mt19937 &rng) {
    source_groups g;
    g.n = n_groups;
    int64_t item = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t len = r % 7 == 3 ? 0 : int64_t(rng() % (max_len + 1));
        g.ptr.push_back(item);
        if (n_groups == 2) g.ptr.push_back(item + int64_t(rng() % (len + 1)));
        item += len;
        g.ptr.push_back(item);
    }
    return g;
}

std::vector<cpu_isa> jit_tiers() {
    std::vector<cpu_isa> out;
    for (cpu_isa isa : {cpu_isa::avx2, cpu_isa::avx512_core, cpu_isa::avx512_core_vnni})
        if (detected_cpu_isa() >= isa) out.push_back(isa);
    return out;
}

} // namespace

// The s8 plans' quad words from a step's weights: the vector fill (AVX-512,
// where this CPU has it) makes the plan's own loop's words and row
// corrections, for the CSR (values in order) and its transpose (values
// gathered), over empty and full rows and words past many 1 KiB groups.
TEST(QuadPlan, vector_fill_matches_the_plans_loop) {
    std::mt19937 rng(11);
    struct shape {
        int64_t rows, cols;
        double density;
    };
    for (const shape &sh : {shape{4, 8, 0.0}, shape{1, 1, 1.0}, shape{3, 17, 1.0}, shape{5, 9, 0.3},
                            shape{64, 65, 0.1}, shape{300, 700, 0.1}, shape{40, 3000, 0.02}})
        for (int threads : {1, 3}) {
            SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + ", "
                         + std::to_string(threads) + " threads");
            std::vector<int64_t> row_ptr{0};
            std::vector<int32_t> col_idx;
            for (int64_t r = 0; r < sh.rows; ++r) {
                for (int64_t c = 0; c < sh.cols; ++c)
                    if (r % 5 != 2 && double(rng() % 10000) < sh.density * 10000) // some rows empty
                        col_idx.push_back(static_cast<int32_t>(c));
                row_ptr.push_back(static_cast<int64_t>(col_idx.size()));
            }
            const int64_t nnz = row_ptr.back();
            std::vector<int8_t> wq(static_cast<size_t>(nnz));
            for (auto &v : wq)
                v = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
            for (bool transposed : {false, true}) {
                SCOPED_TRACE(transposed ? "transpose" : "CSR");
                const detail::sparse_rows m =
                        transposed ? detail::transposed_rows(row_ptr.data(), col_idx.data(),
                                                             sh.rows, sh.cols)
                                   : detail::csr_rows(row_ptr.data(), col_idx.data(), sh.rows);
                const detail::quad_plan q(
                        m, [](int64_t, int64_t quad) { return quad * 256; }, threads);
                ASSERT_EQ(q.value_index.in_order(), !transposed || nnz <= 1);
                // the indices once, as int32 (a transposed plan's), or none
                ASSERT_EQ(q.value_index.bytes(), q.value_index.in_order() ? 0 : 4 * q.entries());
                // one word past the quads: neither fill may write it
                const size_t n_words = static_cast<size_t>(q.quads()) + 1;
                std::vector<uint32_t> want(n_words, 0xABABABABu), words(n_words, 0xCDCDCDCDu);
                auto quads_of = [&](const std::vector<uint32_t> &w) {
                    return std::vector<uint32_t>(w.begin(), w.end() - 1);
                };
                std::vector<int32_t> want_corr(q.rows, 7), corr(q.rows, 9);
                {
                    isa_cap_guard cap(cpu_isa::ref); // the plan's loop
                    q.fill(wq.data(), want.data(), want_corr.data(), threads);
                }
                // the loop's words from their definition
                const std::vector<int64_t> item_of = q.item_of();
                for (int64_t r = 0; r < q.rows; ++r) {
                    int32_t sum = 0;
                    for (int64_t l = q.entry_ptr[r]; l < q.entry_ptr[r + 1]; ++l) {
                        const int8_t v = wq[static_cast<size_t>(q.value_index[l])];
                        const auto bytes = reinterpret_cast<const int8_t *>(want.data());
                        ASSERT_EQ(bytes[item_of[l] * 4 + m.key[l] % 4], v);
                        sum += v;
                    }
                    ASSERT_EQ(want_corr[r], 128 * sum);
                }
                std::vector<int8_t> gathered(static_cast<size_t>(std::max<int64_t>(nnz, 1)));
                q.fill(wq.data(), words.data(), corr.data(), threads, gathered.data());
                EXPECT_EQ(quads_of(words), quads_of(want));
                EXPECT_EQ(words.back(), 0xCDCDCDCDu);
                EXPECT_EQ(want.back(), 0xABABABABu);
                EXPECT_EQ(corr, want_corr);
                // no buffer for the gathered values: the loop, the same words
                std::fill(words.begin(), words.end(), 0u);
                q.fill(wq.data(), words.data(), corr.data(), threads);
                EXPECT_EQ(quads_of(words), quads_of(want));
            }
        }
}

// Bytes that end (or begin) at an inaccessible page, so a read past the end
// (before the start) faults instead of passing unseen.
class guarded_bytes {
public:
    guarded_bytes(size_t n, bool at_end) {
        page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        const size_t pages = (n + page_ - 1) / page_ + 2;
        size_ = pages * page_;
        void *m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) throw std::runtime_error("guarded_bytes: mmap failed");
        base_ = static_cast<uint8_t *>(m);
        mprotect(base_, page_, PROT_NONE);
        mprotect(base_ + size_ - page_, page_, PROT_NONE);
        data_ = at_end ? base_ + size_ - page_ - n : base_ + page_;
    }
    ~guarded_bytes() { munmap(base_, size_); }
    guarded_bytes(const guarded_bytes &) = delete;
    guarded_bytes &operator=(const guarded_bytes &) = delete;
    int8_t *data() { return reinterpret_cast<int8_t *>(data_); }

private:
    size_t page_ = 0, size_ = 0;
    uint8_t *base_ = nullptr, *data_ = nullptr;
};

// The s8 entry pairs' words from a step's weights: the vector fill (AVX2,
// where this CPU has it) makes the words of their definition
// (jit::entry_pair_word of each item's two values, 0 for a missing second),
// for the CSR and its transpose, odd and empty rows, one and two source
// groups, item counts around the vector's 8, and weights that end or start
// at an inaccessible page (its gathers read dwords: none may leave them).
TEST(EntryPairPlan, vector_fill_makes_each_items_word) {
    std::mt19937 rng(12);
    struct shape {
        int64_t rows, cols;
        double density;
    };
    for (const shape &sh :
         {shape{4, 8, 0.0}, shape{1, 1, 1.0}, shape{1, 3, 1.0}, shape{2, 3, 1.0}, shape{3, 17, 1.0},
          shape{5, 9, 0.3}, shape{64, 65, 0.1}, shape{300, 700, 0.1}, shape{40, 3000, 0.02}})
        for (int threads : {1, 3})
            for (int64_t channel_bytes : {int64_t{64}, int64_t{4096}}) // one group, or several
                for (bool at_end : {true, false}) {
                    SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + ", "
                                 + std::to_string(threads) + " threads, channel bytes "
                                 + std::to_string(channel_bytes) + (at_end ? ", end" : ", start"));
                    std::vector<int64_t> row_ptr{0};
                    std::vector<int32_t> col_idx;
                    for (int64_t r = 0; r < sh.rows; ++r) {
                        for (int64_t c = 0; c < sh.cols; ++c)
                            if (r % 5 != 2 && double(rng() % 10000) < sh.density * 10000)
                                col_idx.push_back(static_cast<int32_t>(c));
                        row_ptr.push_back(static_cast<int64_t>(col_idx.size()));
                    }
                    const int64_t nnz = row_ptr.back();
                    guarded_bytes wq(static_cast<size_t>(nnz), at_end);
                    for (int64_t l = 0; l < nnz; ++l)
                        wq.data()[l] = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
                    for (bool transposed : {false, true}) {
                        SCOPED_TRACE(transposed ? "transpose" : "CSR");
                        const detail::sparse_rows m =
                                transposed
                                        ? detail::transposed_rows(row_ptr.data(), col_idx.data(),
                                                                  sh.rows, sh.cols)
                                        : detail::csr_rows(row_ptr.data(), col_idx.data(), sh.rows);
                        const int64_t channels = transposed ? sh.rows : sh.cols;
                        const detail::entry_pair_plan q(
                                m, [](int64_t, int64_t key) { return key * 64; }, channels,
                                channel_bytes, 1, threads);
                        ASSERT_EQ(q.values, nnz);
                        // two int32 indices an item, held once (even in order:
                        // the vector fill reads them)
                        ASSERT_EQ(q.value_index.bytes(), 8 * static_cast<size_t>(q.items()));
                        std::vector<uint32_t> want(static_cast<size_t>(q.items()));
                        for (int64_t i = 0; i < q.items(); ++i) {
                            const int64_t a = q.value_index[2 * i], b = q.value_index[2 * i + 1];
                            want[i] = jit::entry_pair_word(wq.data()[a], b < 0 ? 0 : wq.data()[b]);
                        }
                        // one word past the items: the fill may not write it
                        std::vector<uint32_t> words(want.size() + 1, 0xCDCDCDCDu);
                        q.fill(wq.data(), words.data(), threads);
                        EXPECT_EQ(words.back(), 0xCDCDCDCDu);
                        words.pop_back();
                        EXPECT_EQ(words, want);
                        if (channel_bytes == 4096 && sh.rows * sh.cols >= 3000 && !transposed)
                            EXPECT_GT(q.groups.n, 1);    // the groups' odd segments were met
                        isa_cap_guard cap(cpu_isa::ref); // the plan's loop
                        std::fill(words.begin(), words.end(), 0u);
                        q.fill(wq.data(), words.data(), threads);
                        EXPECT_EQ(words, want);
                    }
                }
}

TEST(ValueIndices, each_index_once_in_the_narrowest_form_that_holds_it) {
    using detail::value_indices;
    const std::vector<int64_t> in_order{0, 1, 2, 3}, shuffled{2, 0, -1, 1};
    const value_indices none(in_order, value_indices::identity::dropped);
    EXPECT_TRUE(none.in_order());
    EXPECT_EQ(none.bytes(), 0u);
    EXPECT_EQ(none.narrow(), nullptr);
    EXPECT_EQ(none.wide(), nullptr);
    for (int64_t s = 0; s < 4; ++s)
        EXPECT_EQ(none[s], s);
    const value_indices held(in_order, value_indices::identity::held);
    EXPECT_FALSE(held.in_order());
    ASSERT_NE(held.narrow(), nullptr);
    EXPECT_EQ(held.bytes(), 4 * in_order.size());
    for (const auto identity : {value_indices::identity::dropped, value_indices::identity::held}) {
        const value_indices narrow(shuffled, identity);
        ASSERT_NE(narrow.narrow(), nullptr);
        EXPECT_EQ(narrow.wide(), nullptr);
        EXPECT_EQ(narrow.bytes(), 4 * shuffled.size());
        for (size_t s = 0; s < shuffled.size(); ++s)
            EXPECT_EQ(narrow[static_cast<int64_t>(s)], shuffled[s]); // -1 (no value) too
    }
    // past 2^31 values an index needs 64 bits: all are held so
    const std::vector<int64_t> far{5, int64_t(1) << 32, -1};
    const value_indices wide(far, value_indices::identity::dropped);
    EXPECT_EQ(wide.narrow(), nullptr);
    ASSERT_NE(wide.wide(), nullptr);
    EXPECT_EQ(wide.bytes(), 8 * far.size());
    for (size_t s = 0; s < far.size(); ++s)
        EXPECT_EQ(wide[static_cast<int64_t>(s)], far[s]);
    EXPECT_TRUE(value_indices({}, value_indices::identity::held).in_order()); // no slots
}

TEST(SpmmSchedule, every_item_once_sorted_by_length) {
    std::mt19937 rng(3);
    for (int64_t n_groups : {1, 2}) {
        const source_groups g = random_groups(50, 30, n_groups, rng);
        const std::vector<int64_t> bounds{0, 17, 50};
        const spmm_schedule s(bounds, g, 256);
        const int64_t items = g.ptr.back();
        std::vector<int64_t> order = s.order;
        std::sort(order.begin(), order.end());
        ASSERT_EQ(static_cast<int64_t>(order.size()), items);
        for (int64_t i = 0; i < items; ++i)
            ASSERT_EQ(order[i], i);
        for (int part = 0; part < 2; ++part)
            for (int64_t grp = 0; grp < n_groups; ++grp) {
                const int64_t k = part * n_groups + grp;
                int64_t row = s.row_at[k], last_len = -1;
                for (int64_t b = s.bucket_at[k]; b < s.bucket_at[k + 1]; ++b) {
                    const int64_t len = s.buckets[2 * b], count = s.buckets[2 * b + 1];
                    EXPECT_GT(len, last_len) << "buckets ascend by length";
                    EXPECT_TRUE(len > 0 || grp == 0) << "empty segments only in the first group";
                    last_len = len;
                    for (int64_t c = 0; c < count; ++c, ++row) {
                        const int32_t *rec = &s.rows[4 * row];
                        const int64_t r = rec[2] / 256;
                        EXPECT_GE(r, bounds[part]);
                        EXPECT_LT(r, bounds[part + 1]);
                        const int64_t begin = g.ptr[r * (n_groups + 1) + grp];
                        EXPECT_EQ(g.ptr[r * (n_groups + 1) + grp + 1] - begin, len);
                        EXPECT_EQ(rec[1], begin) << "the row's first value";
                        for (int64_t i = 0; i < len; ++i)
                            EXPECT_EQ(s.order[rec[0] + i], begin + i) << "its offsets' slots";
                    }
                }
                EXPECT_EQ(row, s.row_at[k + 1]);
                if (grp == 0) EXPECT_EQ(row - s.row_at[k], bounds[part + 1] - bounds[part]);
            }
        for (int64_t l : s.lengths)
            EXPECT_GT(l, 0);
        EXPECT_TRUE(std::is_sorted(s.lengths.begin(), s.lengths.end()));
    }
}

class SpmmPatternKernel
    : public ::testing::TestWithParam<std::tuple<jit::sparse_dtype, int64_t, size_t>> {};

TEST_P(SpmmPatternKernel, matches_the_scalar_model_on_every_tier) {
    const auto [dtype, n_groups, budget] = GetParam();
    const bool s8 = dtype == jit::sparse_dtype::s8;
    std::mt19937 rng(static_cast<unsigned>(n_groups * 100 + budget));
    const int64_t rows = 41, channels = 29, tb = jit::tile_batch;
    const source_groups g = random_groups(rows, 45, n_groups, rng);
    const int64_t items = g.ptr.back();
    const spmm_schedule s({0, rows}, g, jit::tile_row_bytes);
    // plan-order items: a source channel and a value each
    std::vector<int32_t> channel(static_cast<size_t>(items));
    std::vector<uint32_t> word(static_cast<size_t>(items)); // f32 bits or the s8 quad
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t i = 0; i < items; ++i) {
        channel[i] = static_cast<int32_t>(rng() % channels);
        if (s8) {
            word[i] = static_cast<uint32_t>(rng());
        } else {
            const float v = u(rng);
            std::memcpy(&word[i], &v, 4);
        }
    }
    // offsets in schedule order, as the plans store them; values as they are
    std::vector<int32_t> offsets(static_cast<size_t>(items));
    for (int64_t slot = 0; slot < items; ++slot)
        offsets[slot] = channel[s.order[slot]] * jit::tile_row_bytes;
    std::vector<uint8_t> src(static_cast<size_t>(channels * jit::tile_row_bytes));
    for (int64_t c = 0; c < channels * tb; ++c) {
        if (s8) {
            for (int k = 0; k < 4; ++k)
                src[4 * c + k] = static_cast<uint8_t>(rng());
        } else {
            const float v = u(rng);
            std::memcpy(&src[4 * c], &v, 4);
        }
    }
    // s8 entry pairs (avx2 without AVX-VNNI, avx512_core): two weights in [-127, 127]
    // per item (jit::entry_pair_word; the extremes and zeros included), two
    // s8 rows of 64 bytes per item (the second channel its own).
    std::vector<int> pair_weight(2 * word.size());
    for (auto &w : pair_weight) {
        const int pick = static_cast<int>(rng() % 8);
        w = pick == 0   ? 127
            : pick == 1 ? -127
            : pick == 2 ? 0
                        : static_cast<int>(rng() % 255) - 127;
    }
    std::vector<uint32_t> pair_word(word.size());
    for (size_t i = 0; i < pair_word.size(); ++i)
        pair_word[i] = jit::entry_pair_word(pair_weight[2 * i], pair_weight[2 * i + 1]);
    std::vector<int32_t> second_channel(static_cast<size_t>(items));
    for (auto &c : second_channel)
        c = static_cast<int32_t>(rng() % channels);
    std::vector<int32_t> pair_offsets(static_cast<size_t>(2 * items));
    for (int64_t slot = 0; slot < items; ++slot) {
        pair_offsets[2 * slot] = channel[s.order[slot]] * jit::s8_tile_row_bytes;
        pair_offsets[2 * slot + 1] = second_channel[s.order[slot]] * jit::s8_tile_row_bytes;
    }
    std::vector<uint8_t> s8_src(static_cast<size_t>(channels * jit::s8_tile_row_bytes));
    for (auto &b : s8_src)
        b = static_cast<uint8_t>(static_cast<int8_t>(rng() % 255 - 127));
    jit::spmm_pattern_shape shape;
    shape.lengths = s.lengths;
    shape.code_budget = budget;
    // s8 at avx2: quads on AVX-VNNI where the CPU has it, emulated quads and
    // entry pairs on any AVX2 CPU; at avx512_core emulated quads and entry
    // pairs
    struct variant {
        cpu_isa isa;
        jit::s8_word word;
        bool avx_vnni;
    };
    std::vector<variant> variants;
    for (cpu_isa isa : jit_tiers()) {
        const bool s8_avx2 = s8 && isa == cpu_isa::avx2;
        variants.push_back({isa, jit::s8_word::quad, false});
        if (s8_avx2 && cpu_has_avx_vnni()) variants.push_back({isa, jit::s8_word::quad, true});
        if (s8_avx2 || (s8 && isa == cpu_isa::avx512_core))
            variants.push_back({isa, jit::s8_word::entry_pair, false});
    }
    for (const auto &[isa, word_kind, avx_vnni] : variants) {
        const int lanes = jit::vector_lanes(isa);
        const bool entry_pairs = word_kind == jit::s8_word::entry_pair;
        const std::vector<uint32_t> &values = entry_pairs ? pair_word : word;
        const std::vector<uint8_t> &source = entry_pairs ? s8_src : src;
        for (int nv = 1; nv <= tb / lanes; ++nv) {
            SCOPED_TRACE(std::string(to_string(isa)) + (entry_pairs ? " entry pairs" : "")
                         + (avx_vnni ? " avx_vnni" : "") + " n_vec=" + std::to_string(nv));
            auto params = jit::make_sparse_kernel_params(isa, dtype, nv);
            params.word = word_kind;
            params.avx_vnni = avx_vnni;
            const auto code = jit::spmm_pattern_kernel(params, shape);
            const auto exact = jit::exact_body_lengths(params, shape);
            if (budget < 16384)
                EXPECT_LT(exact.size(), s.lengths.size()) << "the budget must leave looped rows";
            else
                EXPECT_EQ(exact, s.lengths);
            std::vector<uint32_t> dst(static_cast<size_t>(rows * tb), 0xdeadbeef);
            for (int64_t grp = 0; grp < n_groups; ++grp) {
                jit::spmm_schedule_call_params c{values.data(),
                                                 entry_pairs ? pair_offsets.data() : offsets.data(),
                                                 s.rows.data() + 4 * s.row_at[grp],
                                                 s.buckets.data() + 2 * s.bucket_at[grp],
                                                 s.bucket_at[grp + 1] - s.bucket_at[grp],
                                                 grp == 0 ? 1 : 0,
                                                 source.data(),
                                                 dst.data()};
                (*code)(c);
            }
            int bad = 0;
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t j = 0; j < nv * lanes; ++j) {
                    int64_t want_i = 0;
                    double want_f = 0, mag = 0;
                    for (int64_t i = g.ptr[r * (n_groups + 1)];
                         i < g.ptr[(r + 1) * (n_groups + 1) - 1]; ++i) {
                        if (entry_pairs) {
                            const int32_t c2[2] = {channel[i], second_channel[i]};
                            for (int k = 0; k < 2; ++k)
                                want_i += int64_t(int8_t(s8_src[c2[k] * tb + j]))
                                          * pair_weight[2 * i + k];
                        } else if (s8) {
                            for (int k = 0; k < 4; ++k)
                                want_i += int64_t(src[(channel[i] * tb + j) * 4 + k])
                                          * int8_t(word[i] >> (8 * k));
                        } else {
                            float w, x;
                            std::memcpy(&w, &word[i], 4);
                            std::memcpy(&x, &src[(channel[i] * tb + j) * 4], 4);
                            want_f += double(w) * x;
                            mag += std::fabs(double(w) * x);
                        }
                    }
                    const uint32_t got = dst[r * tb + j];
                    if (s8) {
                        if (int32_t(got) != want_i && bad++ < 5)
                            ADD_FAILURE() << "row " << r << " lane " << j << ": " << int32_t(got)
                                          << " vs " << want_i;
                    } else {
                        float f;
                        std::memcpy(&f, &got, 4);
                        if (!(std::fabs(f - want_f) <= 1e-5 * mag + 1e-7) && bad++ < 5)
                            ADD_FAILURE() << "row " << r << " lane " << j << ": " << f << " vs "
                                          << want_f;
                    }
                }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(
        dtype_x_groups_x_budget, SpmmPatternKernel,
        ::testing::Combine(::testing::Values(jit::sparse_dtype::f32, jit::sparse_dtype::s8),
                           ::testing::Values(int64_t(1), int64_t(2)),
                           // small: a few exact bodies, the rest looped; large: all exact
                           ::testing::Values(size_t(8192), size_t(1) << 20)));

TEST(SpmmPatternKernel, refuses_bad_lengths) {
    if (detected_cpu_isa() < cpu_isa::avx2) return;
    const auto params = jit::make_sparse_kernel_params(cpu_isa::avx2, jit::sparse_dtype::f32, 1);
    jit::spmm_pattern_shape shape;
    shape.lengths = {3, 3};
    EXPECT_THROW(jit::spmm_pattern_kernel(params, shape), std::invalid_argument);
    shape.lengths = {0, 2};
    EXPECT_THROW(jit::spmm_pattern_kernel(params, shape), std::invalid_argument);
    shape.lengths = {2, 5};
    EXPECT_NO_THROW(jit::spmm_pattern_kernel(params, shape));
}

} // namespace qsp::test
