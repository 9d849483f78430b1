#include "sparse_conv2d_tester.hpp"

namespace qsp::test {

class SparseConv2dF32 : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t>> {};

// kernel size x stride x padding, at several sparsities.
TEST_P(SparseConv2dF32, matches_dense_direct_convolution) {
    const auto [k, stride, pad] = GetParam();
    for (double sparsity : {0.0, 0.5, 0.9, 0.99, 1.0})
        SparseConv2dTester()
                .batch(2)
                .channels(3, 5)
                .image(9, 8)
                .kernel(k, k)
                .stride(stride, stride)
                .padding(pad, pad, pad, pad)
                .sparsity(sparsity)
                .threads(2)
                .Test();
}

INSTANTIATE_TEST_SUITE_P(kernel_stride_padding, SparseConv2dF32,
                         ::testing::Combine(::testing::Values(1, 3, 5, 7),
                                            ::testing::Values(1, 2, 3),
                                            ::testing::Values(0, 1, 2, 3)));

TEST(SparseConv2dF32Edges, odd_sizes) {
    for (int64_t size : {1, 3, 17, 63, 65}) {
        SparseConv2dTester()
                .batch(size > 17 ? 1 : size)
                .channels(3, 4)
                .image(5, 6)
                .sparsity(0.5)
                .Test();
        SparseConv2dTester().channels(size, 3).image(4, 4).sparsity(0.9).Test();
        SparseConv2dTester().channels(2, size).image(3, 5).sparsity(0.9).Test();
        SparseConv2dTester()
                .batch(1)
                .channels(2, 3)
                .image(size, size > 17 ? 9 : size)
                .sparsity(0.5)
                .Test();
    }
    SparseConv2dTester().batch(2).channels(4, 255).image(3, 3).sparsity(0.99).Test();
}

TEST(SparseConv2dF32Edges, asymmetric_padding_stride_dilation) {
    SparseConv2dTester()
            .channels(3, 4)
            .image(11, 9)
            .kernel(3, 5)
            .stride(2, 1)
            .padding(0, 2, 1, 3)
            .Test();
    SparseConv2dTester()
            .channels(3, 4)
            .image(12, 12)
            .kernel(3, 3)
            .dilation(2, 3)
            .padding(2, 3, 2, 3)
            .Test();
    SparseConv2dTester()
            .channels(2, 2)
            .image(13, 7)
            .kernel(5, 1)
            .stride(3, 2)
            .dilation(2, 1)
            .Test();
}

TEST(SparseConv2dF32Edges, groups_and_depthwise) {
    SparseConv2dTester().channels(6, 9).groups(3).image(7, 7).sparsity(0.5).Test();
    SparseConv2dTester().channels(8, 8).groups(8).image(9, 9).kernel(3, 3).sparsity(0.3).Test();
    SparseConv2dTester()
            .channels(4, 8)
            .groups(2)
            .image(6, 6)
            .kernel(3, 3)
            .stride(2, 2)
            .sparsity(0.9)
            .Test();
}

TEST(SparseConv2dF32Edges, all_isa_levels_and_thread_counts) {
    for (isa_level isa : isa_levels())
        for (int threads : {1, 3}) {
            isa_cap_guard cap(isa);
            SparseConv2dTester()
                    .batch(3)
                    .channels(5, 7)
                    .image(10, 9)
                    .kernel(3, 3)
                    .padding(1, 1, 1, 1)
                    .threads(threads)
                    .sparsity(0.8)
                    .Test();
        }
}

} // namespace qsp::test

namespace qsp::test {

// Both schemes, fused backward or not, odd shapes, strides and groups, on
// every tier.
TEST(SparseConv2dSchemes, every_scheme_fused_or_not_on_every_tier) {
    for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8})
        for (bool fused : {false, true}) {
            SparseConv2dTester()
                    .batch(3)
                    .channels(5, 7)
                    .image(9, 8)
                    .sparsity(0.7)
                    .scheme(scheme)
                    .fused(fused)
                    .Test();
            SparseConv2dTester()
                    .batch(1)
                    .channels(6, 9)
                    .groups(3)
                    .image(7, 5)
                    .stride(2, 1)
                    .padding(1, 0, 2, 1)
                    .sparsity(0.5)
                    .scheme(scheme)
                    .fused(fused)
                    .Test();
            SparseConv2dTester()
                    .batch(17)
                    .channels(3, 4)
                    .image(4, 4)
                    .kernel(1, 1)
                    .sparsity(1.0)
                    .scheme(scheme)
                    .fused(fused)
                    .Test();
        }
}

} // namespace qsp::test
