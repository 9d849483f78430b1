#include "sparse_linear_tester.hpp"

namespace qsp::test {

namespace {
const int64_t odd_sizes[] = {1, 3, 17, 63, 65, 255};
const double sparsities[] = {0.0, 0.5, 0.9, 0.99, 1.0};
} // namespace

class SparseLinearF32 : public ::testing::TestWithParam<std::tuple<int64_t, double, int>> {};

// Each odd size is tried in each dimension in turn (batch, in, out) at every
// sparsity and every ISA level the machine has.
TEST_P(SparseLinearF32, matches_dense_in_every_dimension) {
    const auto [size, sparsity, threads] = GetParam();
    for (isa_level isa : isa_levels()) {
        isa_cap_guard cap(isa);
        SCOPED_TRACE(to_string(isa));
        SparseLinearTester().batch(size).in(17).out(65).sparsity(sparsity).threads(threads).Test();
        SparseLinearTester().batch(3).in(size).out(63).sparsity(sparsity).threads(threads).Test();
        SparseLinearTester()
                .batch(17)
                .in(65)
                .out(size)
                .sparsity(sparsity)
                .threads(threads)
                .bias(false)
                .Test();
    }
}

INSTANTIATE_TEST_SUITE_P(odd_sizes_x_sparsity, SparseLinearF32,
                         ::testing::Combine(::testing::ValuesIn(odd_sizes),
                                            ::testing::ValuesIn(sparsities),
                                            ::testing::Values(1, 3)));

TEST(SparseLinearF32Edges, random_shapes) {
    std::mt19937 rng(42);
    std::uniform_int_distribution<int64_t> dim(1, 300);
    std::uniform_real_distribution<double> sp(0.0, 1.0);
    for (int i = 0; i < 12; ++i)
        SparseLinearTester()
                .batch(dim(rng))
                .in(dim(rng))
                .out(dim(rng))
                .sparsity(sp(rng))
                .threads(1 + i % 2)
                .seed(static_cast<unsigned>(i))
                .Test();
}

TEST(SparseLinearF32Edges, results_do_not_depend_on_thread_count) {
    std::mt19937 rng(5);
    const int64_t B = 9, K = 70, N = 33;
    auto dense = random_sparse_dense(N, K, 0.8, rng);
    auto w = csr_weights::from_dense(dense.data(), N, K);
    auto x = random_vector(static_cast<size_t>(B * K), rng);
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 5}) {
        primitive_attr attr;
        attr.num_threads = threads;
        sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_inference,
                                                 f32_desc({B, K}), w.pattern, f32_desc({B, N}),
                                                 quant_scheme::f32, attr);
        std::vector<float> y(static_cast<size_t>(B * N));
        sparse_linear_forward(pd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), x.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())}});
        outs.push_back(y);
    }
    EXPECT_EQ(outs[0], outs[1]);
    EXPECT_EQ(outs[0], outs[2]);
}

} // namespace qsp::test

namespace qsp::test {

// Both schemes, the fused backward and the two-primitive one, odd shapes,
// empty and full rows: every tier (the tester walks them).
TEST(SparseLinearSchemes, every_scheme_fused_or_not_on_every_tier) {
    for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8})
        for (bool fused : {false, true})
            for (auto [b, k, n, sparsity] :
                 {std::tuple<int64_t, int64_t, int64_t, double>{1, 17, 65, 0.9},
                  {17, 63, 3, 0.5},
                  {65, 33, 17, 0.0},
                  {3, 65, 63, 1.0},
                  {70, 130, 40, 0.95}})
                SparseLinearTester()
                        .batch(b)
                        .in(k)
                        .out(n)
                        .sparsity(sparsity)
                        .scheme(scheme)
                        .fused(fused)
                        .Test();
}

// A forced implementation runs (at the full ISA) and matches like the pick.
TEST(SparseLinearSchemes, forced_implementations) {
    for (const char *impl : {"ref:any", "jit:avx2", "jit:avx2:pattern"}) {
        if (effective_cpu_isa() < cpu_isa::avx2 && std::string(impl) != "ref:any") continue;
        for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
            // jit:avx2 steps aside where a better tier runs: force the best one there.
            std::string name = impl;
            if (name != "ref:any" && effective_cpu_isa() >= cpu_isa::avx512_core) {
                const char *tier =
                        scheme == quant_scheme::s8
                                        && effective_cpu_isa() >= cpu_isa::avx512_core_vnni
                                ? "jit:avx512_core_vnni"
                                : "jit:avx512_core";
                name = tier + name.substr(std::string("jit:avx2").size());
            }
            SparseLinearTester()
                    .batch(19)
                    .in(40)
                    .out(33)
                    .sparsity(0.8)
                    .scheme(scheme)
                    .implementation(name)
                    .Test();
        }
    }
}

} // namespace qsp::test
