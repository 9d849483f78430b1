// The JIT Linear kernels against the reference implementation: same
// problems, every ISA tier the machine has, odd sizes, empty and full rows,
// several thread counts, and batch sizes that change while the per-layer
// plan is shared.
#include <cstring>

#include "training_step.hpp"

namespace qsp::test {

namespace {

using f32_outputs = step_result;

// impl: forced for forward and backward-data ("" = the usual pick);
// backward-weights runs its generic sibling.
f32_outputs run_f32(const csr_weights &w, int64_t B, const std::vector<float> &x,
                    const std::vector<float> &dy, const std::vector<float> &b, int threads,
                    const std::string &impl = "") {
    step_options o;
    o.implementation = impl;
    o.threads = threads;
    return training_step(linear_layer{B, w.pattern.cols(), w.pattern.rows()}, w, x, dy, b, o);
}

// |a - b| <= 1e-5 * (|a| + |b|) + tiny, elementwise (both are f32 sums of the
// same terms in different orders).
void expect_close_rel(const std::vector<float> &a, const std::vector<float> &b, double scale,
                      const char *what) {
    ASSERT_EQ(a.size(), b.size());
    int bad = 0;
    for (size_t i = 0; i < a.size(); ++i)
        if (!(std::fabs(a[i] - b[i]) <= 1e-5 * scale + 1e-6) && bad++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

void compare_tiers(int64_t B, int64_t K, int64_t N, double sparsity, int threads, unsigned seed) {
    SCOPED_TRACE("B=" + std::to_string(B) + " K=" + std::to_string(K) + " N=" + std::to_string(N)
                 + " sparsity=" + std::to_string(sparsity) + " threads=" + std::to_string(threads));
    std::mt19937 rng(seed);
    auto dense = random_sparse_dense(N, K, sparsity, rng);
    auto w = csr_weights::from_dense(dense.data(), N, K);
    auto x = random_vector(static_cast<size_t>(B * K), rng);
    auto dy = random_vector(static_cast<size_t>(B * N), rng);
    auto b = random_vector(static_cast<size_t>(N), rng);
    f32_outputs want;
    {
        isa_cap_guard cap(cpu_isa::ref);
        want = run_f32(w, B, x, dy, b, threads);
        ASSERT_EQ(want.impl, "ref:any/ref:any/ref:any");
    }
    // Magnitude bounds of the sums: max row length times the value ranges (<= 1).
    const double scale_fwd = double(K) + 1, scale_bd = double(N), scale_bw = double(B) + 1;
    for (isa_level isa : isa_levels()) {
        if (isa == cpu_isa::ref) continue;
        isa_cap_guard cap(isa);
        const std::string jit = isa >= cpu_isa::avx512_core ? "jit:avx512_core" : "jit:avx2";
        // The usual pick (the layer's specialised code) and the generic kernels.
        for (const std::string &impl : {std::string(), jit}) {
            SCOPED_TRACE(std::string(to_string(isa)) + " " + impl);
            auto got = run_f32(w, B, x, dy, b, threads, impl);
            const std::string fwd = impl.empty() ? jit + ":pattern" : impl;
            EXPECT_EQ(got.impl, fwd + "/" + fwd + "/" + jit);
            expect_close_rel(got.y, want.y, scale_fwd, "forward");
            expect_close_rel(got.dx, want.dx, scale_bd, "backward_data");
            expect_close_rel(got.dw, want.dw, scale_bw, "backward_weights");
            expect_close_rel(got.db, want.db, scale_bw, "diff_bias");
        }
    }
}

} // namespace

class JitLinearF32 : public ::testing::TestWithParam<std::tuple<int64_t, double>> {};

TEST_P(JitLinearF32, matches_reference_on_every_tier) {
    const auto [size, sparsity] = GetParam();
    compare_tiers(size, 33, 47, sparsity, 2, 1);
    compare_tiers(70, size, 31, sparsity, 3, 2);
    compare_tiers(17, 65, size, sparsity, 1, 3);
}

INSTANTIATE_TEST_SUITE_P(odd_sizes_x_sparsity, JitLinearF32,
                         ::testing::Combine(::testing::Values(1, 3, 15, 17, 63, 65, 257),
                                            ::testing::Values(0.0, 0.5, 0.9, 0.99, 1.0)));

TEST(JitLinearF32Edges, larger_layers_and_thread_counts) {
    for (int threads : {1, 2, 3, 8})
        compare_tiers(129, 300, 200, 0.9, threads, 7);
    compare_tiers(256, 768, 64, 0.95, 2, 8);
}

// Rows long enough for several source groups (linear_min_group_items per
// segment): both directions' SpMMs store and reload partial sums.
TEST(JitLinearF32Edges, long_rows_in_several_source_groups) {
    compare_tiers(17, 4096, 8, 0.3, 2, 9); // forward: ~2900 entries per row
    compare_tiers(9, 8, 4096, 0.3, 1, 10); // backward-data: the transpose's rows are as long
}

TEST(JitLinearF32Edges, batch_size_changes_share_one_plan) {
    if (effective_cpu_isa() < cpu_isa::avx512_core) return; // the ref path has no plan to share
    std::mt19937 rng(11);
    const int64_t K = 45, N = 38;
    auto dense = random_sparse_dense(N, K, 0.8, rng);
    auto w = csr_weights::from_dense(dense.data(), N, K);
    set_verbose_level(1);
    testing::internal::CaptureStdout();
    for (int64_t B : {5, 64, 1, 130, 5}) {
        auto x = random_vector(static_cast<size_t>(B * K), rng);
        auto dy = random_vector(static_cast<size_t>(B * N), rng);
        auto b = random_vector(static_cast<size_t>(N), rng);
        auto got = run_f32(w, B, x, dy, b, 2);
        f32_outputs want;
        {
            isa_cap_guard cap(cpu_isa::ref);
            want = run_f32(w, B, x, dy, b, 2);
        }
        expect_close_rel(got.y, want.y, K + 1, "forward");
        expect_close_rel(got.dx, want.dx, N, "backward_data");
        expect_close_rel(got.dw, want.dw, B + 1, "backward_weights");
    }
    const std::string out = testing::internal::GetCapturedStdout();
    set_verbose_level(0);
    size_t generated = 0;
    for (size_t at = out.find(",generated,"); at != std::string::npos;
         at = out.find(",generated,", at + 1))
        ++generated;
    EXPECT_EQ(generated, 3u) << "one plan per direction, whatever the batch size:\n" << out;
}

} // namespace qsp::test

namespace qsp::test {

// Code generated per layer: two layers with different patterns get their
// own (verbose says what was specialised, its size and generation time),
// and each computes its own result.
TEST(JitLinearPattern, each_layer_gets_its_own_code) {
    if (effective_cpu_isa() < cpu_isa::avx2) return; // the reference has no code
    const std::string impl = effective_cpu_isa() >= cpu_isa::avx512_core ? "jit:avx512_core:pattern"
                                                                         : "jit:avx2:pattern";
    std::mt19937 rng(21);
    const int64_t B = 70, K = 300, N = 40;
    auto x = random_vector(static_cast<size_t>(B * K), rng);
    auto dy = random_vector(static_cast<size_t>(B * N), rng);
    auto b = random_vector(static_cast<size_t>(N), rng);
    std::vector<std::string> lines;
    for (double sparsity : {0.5, 0.95}) {
        auto dense = random_sparse_dense(N, K, sparsity, rng);
        auto w = csr_weights::from_dense(dense.data(), N, K);
        set_verbose_level(1);
        testing::internal::CaptureStdout();
        auto got = run_f32(w, B, x, dy, b, 2, impl);
        const std::string out = testing::internal::GetCapturedStdout();
        set_verbose_level(0);
        f32_outputs want;
        {
            isa_cap_guard cap(cpu_isa::ref);
            want = run_f32(w, B, x, dy, b, 2);
        }
        expect_close_rel(got.y, want.y, K + 1, "forward");
        expect_close_rel(got.dx, want.dx, N, "backward_data");
        for (const char *dir : {",forward,", ",backward_data,"}) {
            const size_t at = out.find("qsp_verbose,jit,plan," + impl + dir);
            ASSERT_NE(at, std::string::npos) << out;
            const std::string line = out.substr(at, out.find('\n', at) - at);
            EXPECT_NE(line.find(",generated,"), std::string::npos) << line;
            for (const char *field :
                 {"specialised:groups=", ",lengths=", ",exact=", ",code_bytes=", ",generate_ms="})
                EXPECT_NE(line.find(field), std::string::npos) << field << " in " << line;
            const size_t from = line.find("specialised:");
            lines.push_back(line.substr(from, line.find(",generate_ms=") - from)); // no timing
        }
    }
    // forward of layer 1 vs layer 2: different lengths, different code
    EXPECT_NE(lines[0].find(",exact="), std::string::npos);
    EXPECT_NE(lines[0], lines[2]);
    EXPECT_NE(lines[1], lines[3]);
}

} // namespace qsp::test

namespace qsp::test {

// The specialised code adds a row's terms in the generic kernel's order:
// where both take the source channels as one group (a layer of fewer input
// features than an L1 group holds), forward and backward-data agree bit for
// bit, on every tier and batch tail.
TEST(JitLinearPattern, adds_in_the_generic_kernels_order) {
    std::mt19937 rng(23);
    const int64_t K = 40, N = 36;
    for (double sparsity : {0.0, 0.5, 0.9}) {
        auto dense = random_sparse_dense(N, K, sparsity, rng);
        auto w = csr_weights::from_dense(dense.data(), N, K);
        for (int64_t B : {64, 70, 5}) {
            auto x = random_vector(static_cast<size_t>(B * K), rng);
            auto dy = random_vector(static_cast<size_t>(B * N), rng);
            auto b = random_vector(static_cast<size_t>(N), rng);
            for (isa_level isa : isa_levels()) {
                if (isa < cpu_isa::avx2) continue;
                isa_cap_guard cap(isa);
                const std::string jit =
                        isa >= cpu_isa::avx512_core ? "jit:avx512_core" : "jit:avx2";
                SCOPED_TRACE(jit + " B=" + std::to_string(B)
                             + " sparsity=" + std::to_string(sparsity));
                const auto generic = run_f32(w, B, x, dy, b, 2, jit);
                const auto pattern = run_f32(w, B, x, dy, b, 2, jit + ":pattern");
                ASSERT_EQ(pattern.impl, jit + ":pattern/" + jit + ":pattern/" + jit);
                EXPECT_EQ(0, std::memcmp(generic.y.data(), pattern.y.data(), 4 * generic.y.size()));
                EXPECT_EQ(0,
                          std::memcmp(generic.dx.data(), pattern.dx.data(), 4 * generic.dx.size()));
            }
        }
    }
}

} // namespace qsp::test
