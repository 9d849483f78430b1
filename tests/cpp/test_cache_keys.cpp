// Caches compare whole keys: two layers whose patterns share every hashed
// field (the hash is forced equal through a test hook) each get their own
// plan, their own tuning decision and their own results.
#include <cstring>

#include "primitives/core/testing_hooks.hpp"
#include "training_step.hpp"

namespace qsp::test {

namespace {

struct forced_hash_guard {
    forced_hash_guard() { detail::force_pattern_hash_for_testing(true, 0x5eed); }
    ~forced_hash_guard() { detail::force_pattern_hash_for_testing(false); }
};

using outputs = step_result;

// A training step without bias (rounding seed 5).
outputs run_layer(const csr_weights &w, int64_t B, const std::vector<float> &x,
                  const std::vector<float> &dy, quant_scheme scheme, const std::string &impl) {
    step_options o;
    o.scheme = scheme;
    o.implementation = impl;
    o.bias = false;
    o.seed = 5;
    return training_step(linear_layer{B, w.pattern.cols(), w.pattern.rows()}, w, x, dy, {}, o);
}

size_t cache_size(const std::string &name) {
    for (const cache_info &c : cache_infos())
        if (c.name == name) return c.size;
    return 0;
}

void expect_near(const std::vector<float> &a, const std::vector<float> &b, const char *what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t i = 0; i < a.size(); ++i)
        ASSERT_NEAR(a[i], b[i], 1e-4 * (1 + std::fabs(b[i]))) << what << "[" << i << "]";
}

} // namespace

TEST(CacheKeys, layers_with_one_pattern_hash_compute_their_own_results) {
    std::mt19937 rng(31);
    const int64_t B = 70, K = 90, N = 50;
    // Same shape, different patterns and values, one hash.
    forced_hash_guard forced;
    auto wa = csr_weights::from_dense(random_sparse_dense(N, K, 0.8, rng).data(), N, K);
    auto wb = csr_weights::from_dense(random_sparse_dense(N, K, 0.8, rng).data(), N, K);
    ASSERT_EQ(wa.pattern.hash(), wb.pattern.hash());
    ASSERT_NE(wa.pattern, wb.pattern) << "equality compares the patterns, not the hashes";
    auto x = random_vector(static_cast<size_t>(B * K), rng);
    auto dy = random_vector(static_cast<size_t>(B * N), rng);
    for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
        SCOPED_TRACE(to_string(scheme));
        // The truth, from the reference (no plan to mix up).
        const outputs ref_a = run_layer(wa, B, x, dy, scheme, "ref:any");
        const outputs ref_b = run_layer(wb, B, x, dy, scheme, "ref:any");
        const size_t plans_before = cache_size("jit_plan");
        const outputs a = run_layer(wa, B, x, dy, scheme, "");
        const outputs b = run_layer(wb, B, x, dy, scheme, "");
        const outputs a_again = run_layer(wa, B, x, dy, scheme, "");
        if (scheme == quant_scheme::s8) {
            // s8 is exact: equal bit for bit to the reference
            EXPECT_EQ(a.y, ref_a.y);
            EXPECT_EQ(b.y, ref_b.y);
            EXPECT_EQ(a.dx, ref_a.dx);
            EXPECT_EQ(b.dx, ref_b.dx);
            EXPECT_EQ(a.dw, ref_a.dw);
            EXPECT_EQ(b.dw, ref_b.dw);
        } else {
            expect_near(a.y, ref_a.y, "a.y");
            expect_near(b.y, ref_b.y, "b.y");
            expect_near(a.dx, ref_a.dx, "a.dx");
            expect_near(b.dx, ref_b.dx, "b.dx");
            expect_near(a.dw, ref_a.dw, "a.dw");
            expect_near(b.dw, ref_b.dw, "b.dw");
        }
        EXPECT_EQ(a_again.y, a.y);
        if (effective_cpu_isa() >= cpu_isa::avx2)
            EXPECT_EQ(cache_size("jit_plan"), plans_before + 6) << "three plans per layer";
    }
}

TEST(CacheKeys, backward_hint_with_a_colliding_pattern_is_refused) {
    std::mt19937 rng(32);
    forced_hash_guard forced;
    auto pa = csr_pattern::from_dense(random_sparse_dense(8, 9, 0.5, rng).data(), 8, 9);
    auto pb = csr_pattern::from_dense(random_sparse_dense(8, 9, 0.5, rng).data(), 8, 9);
    ASSERT_EQ(pa.hash(), pb.hash());
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    sparse_linear_forward::primitive_desc fwd(eng, prop_kind::forward_training, f32_desc({3, 9}),
                                              pa, f32_desc({3, 8}), quant_scheme::f32);
    EXPECT_THROW(sparse_linear_backward_data::primitive_desc(eng, f32_desc({3, 9}), pb,
                                                             f32_desc({3, 8}), fwd),
                 std::invalid_argument);
}

TEST(CacheKeys, a_tuning_decision_is_not_taken_for_a_colliding_pattern) {
    std::mt19937 rng(33);
    forced_hash_guard forced;
    auto pa = csr_pattern::from_dense(random_sparse_dense(64, 96, 0.9, rng).data(), 64, 96);
    auto pb = csr_pattern::from_dense(random_sparse_dense(64, 96, 0.9, rng).data(), 64, 96);
    ASSERT_EQ(pa.hash(), pb.hash());
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    auto make = [&](const csr_pattern &p) {
        return sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                     f32_desc({32, 96}), p, f32_desc({32, 64}),
                                                     quant_scheme::s8);
    };
    clear_tuning_decisions();
    const tuning_result r = tune(make(pa));
    if (!r.measured) { // one s8 implementation on this CPU: nothing to decide, nothing stored
        EXPECT_TRUE(r.candidates.empty());
        EXPECT_EQ(make(pa).impl_info_str(), r.chosen);
        EXPECT_EQ(cache_size("tuning_decisions"), 0u);
        return;
    }
    set_verbose_level(2);
    testing::internal::CaptureStdout();
    make(pa);
    make(pb);
    const std::string out = testing::internal::GetCapturedStdout();
    set_verbose_level(0);
    const size_t first = out.find("(tuned decision)"), second = out.find("(first accepting");
    EXPECT_NE(first, std::string::npos) << out;
    EXPECT_NE(second, std::string::npos) << "pb must not take pa's decision:\n" << out;
    EXPECT_LT(first, second) << out;
}

} // namespace qsp::test
