#include <stdexcept>

#include "test_utils.hpp"

namespace qsp::test {

TEST(CsrPattern, from_dense_round_trips_and_counts) {
    std::mt19937 rng(1);
    for (double sp : {0.0, 0.5, 0.9, 1.0}) {
        auto dense = random_sparse_dense(17, 63, sp, rng);
        auto w = csr_weights::from_dense(dense.data(), 17, 63);
        EXPECT_EQ(w.to_dense(), dense);
        int64_t nz = 0;
        for (float v : dense)
            nz += v != 0.f;
        EXPECT_EQ(w.pattern.nnz(), nz);
        EXPECT_NEAR(w.pattern.density(), double(nz) / (17 * 63), 1e-12);
    }
}

TEST(CsrPattern, threshold_and_mask) {
    std::vector<float> d = {0.f, 0.1f, -0.5f, 2.f, 0.f, -0.05f};
    EXPECT_EQ(csr_pattern::from_dense(d.data(), 2, 3, 0.1f).nnz(), 2);
    // A mask keeps an exact zero that the pruning left in the pattern.
    std::vector<uint8_t> m = {1, 0, 0, 0, 1, 1};
    auto p = csr_pattern::from_mask(m.data(), 2, 3);
    EXPECT_EQ(p.nnz(), 3);
    EXPECT_EQ(p.row_ptr()[1], 1);
    EXPECT_EQ(p.col_idx()[0], 0);
    EXPECT_EQ(p.col_idx()[1], 1);
    expect_refusal([&] { csr_pattern::from_dense(d.data(), 2, 3, -1.f); }, "threshold");
}

TEST(CsrPattern, from_indices_accepts_valid_and_hashes_content) {
    auto a = csr_pattern::from_indices(3, 4, {0, 2, 2, 3}, {0, 3, 1});
    auto b = csr_pattern::from_indices(3, 4, {0, 2, 2, 3}, {0, 3, 1});
    auto c = csr_pattern::from_indices(3, 4, {0, 2, 2, 3}, {0, 3, 2});
    EXPECT_EQ(a.hash(), b.hash());
    EXPECT_NE(a.hash(), c.hash());
    EXPECT_EQ(csr_pattern::from_indices(0, 5, {0}, {}).nnz(), 0);
}

TEST(CsrPattern, from_indices_rejects_each_malformed_input) {
    expect_refusal([] { csr_pattern::from_indices(-1, 4, {0}, {}); }, "rows must be >= 0");
    expect_refusal([] { csr_pattern::from_indices(2, -4, {0, 0, 0}, {}); }, "cols must be >= 0");
    expect_refusal(
            [] {
                csr_pattern::from_indices(1, int64_t(1) << 31, {0, 0}, {});
            },
            "32-bit column index");
    expect_refusal([] { csr_pattern::from_indices(3, 4, {0, 1, 2}, {0, 1}); }, "rows + 1");
    expect_refusal(
            [] {
                csr_pattern::from_indices(2, 4, {1, 1, 2}, {0, 1});
            },
            "row_ptr[0] must be 0");
    expect_refusal([] { csr_pattern::from_indices(2, 4, {0, 2, 1}, {0, 1}); }, "non-decreasing");
    expect_refusal(
            [] {
                csr_pattern::from_indices(2, 4, {0, 1, 3}, {0, 1});
            },
            "number of column indices");
    expect_refusal([] { csr_pattern::from_indices(2, 4, {0, 1, 2}, {0, 4}); }, "out of range");
    expect_refusal([] { csr_pattern::from_indices(2, 4, {0, 1, 2}, {-1, 0}); }, "out of range");
    expect_refusal([] { csr_pattern::from_indices(1, 4, {0, 2}, {2, 1}); }, "strictly increasing");
    expect_refusal([] { csr_pattern::from_indices(1, 4, {0, 2}, {1, 1}); }, "no duplicates");
}

} // namespace qsp::test
