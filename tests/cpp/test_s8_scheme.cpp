// The s8 primitives against an exact integer model of the quantization
// scheme written here from its statement in quantization.hpp (not from the
// library's code): outputs must match bit for bit.
#include <algorithm>
#include <cstring>

#include "primitives/core/s8_protocol.hpp"
#include "primitives/passes/quantize.hpp"
#include "training_step.hpp"

namespace qsp::test {

namespace {

struct quantized {
    std::vector<int8_t> q;
    float scale = 0.f;
};

int8_t clamp127(float v) {
    return static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
}

quantized model_rne(const std::vector<float> &x) {
    float amax = 0.f;
    for (float v : x)
        amax = std::max(amax, std::fabs(v));
    quantized r;
    r.scale = amax / 127.f;
    r.q.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i)
        r.q[i] = r.scale > 0 ? clamp127(std::nearbyint(x[i] * (1.f / r.scale))) : 0;
    return r;
}

// v[i] = x[i] * mult[channel(i)], stochastically rounded: the step's seed
// gives one 32-bit hash per element; G2 (for dX) takes its high 16 bits as
// noise, G1 (for dW) its low 16; t = v / scale clamped to +-127 rounds to
// floor((rne(t * 65536) + noise) / 65536).
quantized model_sr(const std::vector<float> &x, const std::vector<float> &mult, int64_t channels,
                   int64_t inner, uint64_t seed, bool for_dx) {
    std::vector<float> v(x.size());
    for (size_t i = 0; i < x.size(); ++i)
        v[i] = mult.empty() ? x[i] : x[i] * mult[(i / inner) % channels];
    float amax = 0.f;
    for (float a : v)
        amax = std::max(amax, std::fabs(a));
    quantized r;
    r.scale = amax / 127.f;
    r.q.resize(x.size());
    const uint32_t key = rounding_seed32(seed) & ~1u;
    for (size_t i = 0; i < x.size(); ++i) {
        const uint32_t h = mix32(static_cast<uint32_t>(i) ^ key);
        const double noise = for_dx ? h >> 16 : h & 0xffffu;
        const float t = std::min(std::max(v[i] * (1.f / r.scale), -127.f), 127.f);
        r.q[i] = r.scale > 0 ? clamp127(static_cast<float>(
                         std::floor((std::nearbyint(t * 65536.f) + noise) / 65536.)))
                             : 0;
    }
    return r;
}

struct model_weights {
    std::vector<int8_t> q;    // nnz
    std::vector<float> scale; // rows
};

model_weights model_weight_quant(const csr_pattern &p, const std::vector<float> &values) {
    model_weights m;
    m.q.resize(values.size());
    for (int64_t r = 0; r < p.rows(); ++r) {
        float amax = 0.f;
        for (int64_t e = p.row_ptr()[r]; e < p.row_ptr()[r + 1]; ++e)
            amax = std::max(amax, std::fabs(values[e]));
        const float s = amax / 127.f;
        for (int64_t e = p.row_ptr()[r]; e < p.row_ptr()[r + 1]; ++e)
            m.q[e] = s > 0 ? clamp127(std::nearbyint(values[e] * (1.f / s))) : 0;
        m.scale.push_back(s);
    }
    return m;
}

void expect_bitwise_equal(const std::vector<float> &got, const std::vector<float> &want,
                          const char *what) {
    ASSERT_EQ(got.size(), want.size());
    int reported = 0;
    for (size_t i = 0; i < got.size(); ++i)
        if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && reported++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", model " << want[i];
}

struct linear_s8_run : step_result {
    std::string bwd_weights_impl;
};

// `impl` forces one implementation for all three directions ("" = the
// usual pick), so every implementation is held to the model; a
// pattern-specialised one ("...:pattern") runs forward and backward-data,
// backward-weights runs its generic sibling (the SDDMM has one form).
linear_s8_run run_linear_s8(const csr_weights &w, int64_t B, const std::vector<float> &x,
                            const std::vector<float> &b, const std::vector<float> &dy,
                            uint64_t seed, int threads, const std::string &impl = "") {
    step_options o;
    o.scheme = quant_scheme::s8;
    o.implementation = impl;
    o.threads = threads;
    o.seed = seed;
    linear_s8_run r{
            training_step(linear_layer{B, w.pattern.cols(), w.pattern.rows()}, w, x, dy, b, o), {}};
    r.bwd_weights_impl = r.impl.substr(r.impl.rfind('/') + 1);
    return r;
}

} // namespace

TEST(S8Scheme, dense_onednn_only_where_its_int8_is_exact) {
    auto w = csr_weights::from_dense(std::vector<float>(12, 1.f).data(), 3, 4);
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    primitive_attr attr;
    attr.implementation = "dense:onednn_s8";
    auto make = [&] {
        return sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                     f32_desc({2, 4}), w.pattern, f32_desc({2, 3}),
                                                     quant_scheme::s8, attr);
    };
    if (onednn_has_vnni() && effective_cpu_isa() != cpu_isa::ref) {
        EXPECT_EQ(make().impl_info_str(), "dense:onednn_s8");
    } else {
        try {
            make();
            ADD_FAILURE() << "dense:onednn_s8 accepted without VNNI";
        } catch (const std::invalid_argument &e) {
            EXPECT_NE(std::string(e.what()).find("dense:onednn_s8"), std::string::npos) << e.what();
        }
    }
}

class SparseLinearS8 : public ::testing::TestWithParam<std::tuple<int64_t, double>> {};

TEST_P(SparseLinearS8, matches_exact_integer_model) {
    const auto [size, sparsity] = GetParam();
    for (auto [B, K, N] : {std::tuple<int64_t, int64_t, int64_t>{size, 17, 65},
                           {3, size, 63},
                           {17, 65, size},
                           // wide enough for several column blocks of the s8 SpMM, both directions
                           {std::min<int64_t>(size, 17), 1000, 400},
                           // rows long enough for several source groups of the s8 SpMM
                           {std::min<int64_t>(size, 9), 6000, 9}}) {
        SCOPED_TRACE("B=" + std::to_string(B) + " K=" + std::to_string(K)
                     + " N=" + std::to_string(N));
        std::mt19937 rng(static_cast<unsigned>(B * 1000 + K * 10 + N));
        auto dense = random_sparse_dense(N, K, sparsity, rng);
        auto w = csr_weights::from_dense(dense.data(), N, K);
        auto x = random_vector(static_cast<size_t>(B * K), rng, -3.f, 2.f);
        auto dy = random_vector(static_cast<size_t>(B * N), rng, -0.01f, 0.02f);
        auto b = random_vector(static_cast<size_t>(N), rng);
        const uint64_t seed = 0x1234567890abcdefull + size;
        for (isa_level isa : isa_levels()) {
            // Every implementation an s8 Linear has at this tier.
            std::vector<std::string> impls = {"", "ref:any"};
            if (isa >= cpu_isa::avx2) {
                const std::string jit = isa == cpu_isa::avx512_core_vnni ? "jit:avx512_core_vnni"
                                        : isa == cpu_isa::avx512_core    ? "jit:avx512_core"
                                                                         : "jit:avx2";
                impls.push_back(jit);
                impls.push_back(jit + ":pattern");
                if (onednn_has_vnni()) impls.push_back("dense:onednn_s8");
            }
            for (const std::string &impl : impls) {
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa))
                             + " implementation=" + (impl.empty() ? "(picked)" : impl));
                auto run = run_linear_s8(w, B, x, b, dy, seed, 3, impl);
                if (impl.empty() && isa >= cpu_isa::avx2)
                    EXPECT_EQ(run.bwd_weights_impl, impls[2]) << "first in list order";
                if (!impl.empty()) EXPECT_EQ(run.bwd_weights_impl, generic_sibling(impl));

                const auto xq = model_rne(x);
                const auto wq = model_weight_quant(w.pattern, w.values);
                const auto g1 = model_sr(dy, {}, 1, 1, seed, false);
                const auto g2 = model_sr(dy, wq.scale, N, 1, seed, true);
                const int64_t *rp = w.pattern.row_ptr();
                const int32_t *ci = w.pattern.col_idx();
                std::vector<float> y(run.y.size()), dx(run.dx.size()), dw(run.dw.size());
                std::vector<int64_t> dx_acc(dx.size(), 0);
                for (int64_t i = 0; i < B; ++i)
                    for (int64_t n = 0; n < N; ++n) {
                        int64_t acc = 0;
                        for (int64_t e = rp[n]; e < rp[n + 1]; ++e) {
                            acc += int64_t(wq.q[e]) * xq.q[i * K + ci[e]];
                            dx_acc[i * K + ci[e]] += int64_t(wq.q[e]) * g2.q[i * N + n];
                        }
                        y[i * N + n] = float(acc) * (xq.scale * wq.scale[n]) + b[n];
                    }
                for (size_t i = 0; i < dx.size(); ++i)
                    dx[i] = float(dx_acc[i]) * g2.scale;
                for (int64_t n = 0; n < N; ++n)
                    for (int64_t e = rp[n]; e < rp[n + 1]; ++e) {
                        int64_t acc = 0;
                        for (int64_t i = 0; i < B; ++i)
                            acc += int64_t(g1.q[i * N + n]) * xq.q[i * K + ci[e]];
                        dw[e] = float(acc) * (g1.scale * xq.scale);
                    }
                expect_bitwise_equal(run.y, y, "forward dst");
                expect_bitwise_equal(run.dx, dx, "backward_data diff_src");
                expect_bitwise_equal(run.dw, dw, "backward_weights diff_weights");
                // The workspace holds the quantized src and its scale, and
                // the quantized weights and their scales that backward-data
                // read back (the weights are quantized once per step).
                const detail::s8::workspace_layout at(B * K, w.pattern.nnz(), N);
                ASSERT_EQ(run.workspace.size(), at.bytes);
                float ws_scale;
                std::memcpy(&ws_scale, run.workspace.data(), sizeof(float));
                EXPECT_EQ(ws_scale, xq.scale);
                // (memcmp of an empty vector's null data() is undefined)
                auto same = [&](size_t offset, const void *want, size_t bytes) {
                    return bytes == 0
                           || std::memcmp(run.workspace.data() + offset, want, bytes) == 0;
                };
                EXPECT_TRUE(same(at.src_q, xq.q.data(), xq.q.size()));
                EXPECT_TRUE(same(at.weights_q, wq.q.data(), wq.q.size()));
                EXPECT_TRUE(
                        same(at.weight_scale, wq.scale.data(), wq.scale.size() * sizeof(float)));
            }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(odd_sizes_x_sparsity, SparseLinearS8,
                         ::testing::Combine(::testing::Values(1, 3, 17, 63, 65, 255),
                                            ::testing::Values(0.0, 0.5, 0.9, 0.99, 1.0)));

TEST(S8Scheme, seeded_rounding_is_reproducible_and_thread_independent) {
    std::mt19937 rng(9);
    const int64_t B = 33, K = 40, N = 21;
    auto dense = random_sparse_dense(N, K, 0.7, rng);
    auto w = csr_weights::from_dense(dense.data(), N, K);
    auto x = random_vector(static_cast<size_t>(B * K), rng);
    auto dy = random_vector(static_cast<size_t>(B * N), rng);
    auto b = random_vector(static_cast<size_t>(N), rng);
    auto a = run_linear_s8(w, B, x, b, dy, 77, 1);
    auto c = run_linear_s8(w, B, x, b, dy, 77, 3);
    auto d = run_linear_s8(w, B, x, b, dy, 78, 2);
    EXPECT_EQ(a.dx, c.dx);
    EXPECT_EQ(a.dw, c.dw);
    EXPECT_NE(a.dx, d.dx) << "a different seed must round differently";
    EXPECT_NE(a.dw, d.dw);
}

TEST(S8Scheme, stochastic_rounding_is_unbiased_and_clamps) {
    // One element pins the scale to 1/127 * 1.0; the others sit between
    // two quantization levels, 0.3 of the way up.
    const int64_t n = 4096;
    std::vector<float> x(n, 0.3f / 127.f * 1.0f + 5.f / 127.f);
    x[0] = 1.f;
    double sum = 0;
    const int seeds = 64;
    std::vector<int8_t> q(n);
    for (int s = 0; s < seeds; ++s) {
        const float scale = detail::portable::quantize_stochastic(x.data(), n, nullptr, 1, 1,
                                                                  rounding_seed32(s), q.data(), 2);
        EXPECT_FLOAT_EQ(scale, 1.f / 127.f);
        EXPECT_EQ(q[0], 127);
        for (int64_t i = 1; i < n; ++i) {
            ASSERT_TRUE(q[i] == 5 || q[i] == 6) << int(q[i]);
            sum += q[i];
        }
    }
    EXPECT_NEAR(sum / (seeds * (n - 1)), 5.3, 0.01);
    // Extremes land on +-127, never wrap.
    std::vector<float> y = {-1.f, 1.f, -0.99999f, 0.99999f};
    std::vector<int8_t> qy(4);
    detail::portable::quantize_stochastic(y.data(), 4, nullptr, 1, 1, 1, qy.data(), 1);
    EXPECT_EQ(qy[0], -127);
    EXPECT_EQ(qy[1], 127);
    EXPECT_GE(qy[2], -127);
    EXPECT_LE(qy[3], 127);
}

// G1 and G2 take the two halves of one hash per element: independent
// roundings still. Values halfway between two levels round up with
// probability 1/2 in each copy; with independent noise the copies agree on
// half of them (with one noise, on all), and each copy's mean is unbiased.
TEST(S8Scheme, the_two_gradient_copies_round_independently) {
    const int64_t n = 1 << 16;
    std::vector<float> x(n, 5.5f / 127.f);
    x[0] = 1.f; // the scale: 1/127
    std::vector<int8_t> g1(n), g2(n);
    for (uint64_t seed : {3u, 1234567u}) {
        const uint32_t dw = detail::s8::dw_stream(seed), dx = detail::s8::dx_stream(seed);
        ASSERT_EQ(dw | 1u, dx) << "one key, bit 0 apart";
        const auto scales = detail::quantize_stochastic_pair(x.data(), n, nullptr, 1, 1, dx,
                                                             g2.data(), dw, g1.data(), nullptr, 2);
        EXPECT_FLOAT_EQ(scales.scaled, 1.f / 127.f);
        int64_t agree = 0, up1 = 0, up2 = 0;
        for (int64_t i = 1; i < n; ++i) {
            ASSERT_TRUE((g1[i] == 5 || g1[i] == 6) && (g2[i] == 5 || g2[i] == 6));
            agree += g1[i] == g2[i];
            up1 += g1[i] == 6;
            up2 += g2[i] == 6;
        }
        const double m = static_cast<double>(n - 1);
        // 4 standard deviations of a fair coin over 65535 draws: 0.0078
        EXPECT_NEAR(agree / m, 0.5, 0.008);
        EXPECT_NEAR(up1 / m, 0.5, 0.008);
        EXPECT_NEAR(up2 / m, 0.5, 0.008);
    }
}

// Given max |src| (as a BatchNorm's forward finds it), the s8 forward skips
// its pass finding it: the same output and workspace as without, on every
// tier and implementation family; twice the maximum gives another int8
// input (it is read, not found again).
TEST(S8Scheme, the_forward_takes_its_inputs_maximum) {
    std::mt19937 rng(12);
    conv2d_geometry g = same_3x3();
    const conv2d_layer conv{2, 5, 6, 7, 9, g};
    auto w = csr_weights::from_dense(random_sparse_dense(6, 5 * 9, 0.7, rng).data(), 6, 5 * 9);
    auto x = random_vector(static_cast<size_t>(2 * 5 * 7 * 9), rng);
    const auto hw = conv.out_hw();
    auto dy = random_vector(static_cast<size_t>(2 * 6 * hw[0] * hw[1]), rng);
    float known = 0.f;
    for (float v : x)
        known = std::max(known, std::fabs(v));
    const float doubled = 2 * known;
    const std::vector<float> bias(6, 0.25f);
    for_each_s8_conv_case([&](step_options o) {
        const step_result found = training_step(conv, w, x, dy, bias, o);
        o.src_abs_max = &known;
        const step_result given = training_step(conv, w, x, dy, bias, o);
        expect_same_bits(given.y, found.y, "dst");
        EXPECT_EQ(given.workspace, found.workspace);
        o.src_abs_max = &doubled;
        const step_result wrong = training_step(conv, w, x, dy, bias, o);
        EXPECT_NE(wrong.workspace, found.workspace) << "the maximum was not read";
    });
}

// src given quantized (QSP_ARG_SRC_S8: a BatchNorm that writes only the
// int8 input of the convolution after it) stands for src: the same output,
// workspace and backward on every tier, vectorization and the oneDNN
// family, whether the integers sit where the workspace keeps them (used in
// place) or elsewhere (copied); other integers give another output (they
// are read), and the scale is the one given.
TEST(S8Scheme, the_forward_takes_its_input_quantized) {
    std::mt19937 rng(14);
    const conv2d_layer conv{3, 5, 6, 7, 9, same_3x3()};
    auto w = csr_weights::from_dense(random_sparse_dense(6, 5 * 9, 0.7, rng).data(), 6, 5 * 9);
    auto x = random_vector(static_cast<size_t>(3 * 5 * 7 * 9), rng);
    const auto hw = conv.out_hw();
    auto dy = random_vector(static_cast<size_t>(3 * 6 * hw[0] * hw[1]), rng);
    float peak = 0.f;
    for (float v : x)
        peak = std::max(peak, std::fabs(v));
    const quant_scale rule = quant_scale_from_abs_max(peak); // quantization.hpp's
    std::vector<int8_t> q(x.size());
    for (size_t i = 0; i < x.size(); ++i)
        q[i] = static_cast<int8_t>(std::nearbyint(x[i] * rule.inv));
    std::vector<int8_t> other = q;
    other[7] = static_cast<int8_t>(other[7] == 0 ? 1 : 0);
    const std::vector<float> bias(6, 0.25f);
    auto check = [&](step_options o) {
        const step_result found = training_step(conv, w, x, dy, bias, o);
        o.src_s8 = &q;
        o.src_s8_scale = rule.scale;
        for (bool in_workspace : {true, false}) {
            SCOPED_TRACE(in_workspace ? "in the workspace" : "elsewhere");
            o.src_s8_in_workspace = in_workspace;
            const step_result given = training_step(conv, w, x, dy, bias, o);
            EXPECT_EQ(given.impl, found.impl);
            expect_same_bits(given.y, found.y, "dst");
            EXPECT_EQ(given.workspace, found.workspace);
            expect_same_bits(given.dx, found.dx, "diff_src");
            expect_same_bits(given.dw, found.dw, "diff_weights");
        }
        o.src_s8 = &other;
        const step_result changed = training_step(conv, w, x, dy, bias, o);
        EXPECT_NE(changed.y, found.y) << "the integers were not read";
        o.src_s8 = &q;
        o.src_s8_scale = 2 * rule.scale;
        const step_result scaled = training_step(conv, w, x, dy, bias, o);
        for (size_t i = 0; i < found.y.size(); ++i) // bias 0.25 outside the sum
            ASSERT_NEAR(scaled.y[i] - 0.25f, 2 * (found.y[i] - 0.25f),
                        1e-5f * (1 + std::fabs(found.y[i])))
                    << "the scale given is the scale used, " << i;
    };
    for_each_s8_conv_case(check);
    if (onednn_has_vnni()) {
        SCOPED_TRACE("dense:onednn_s8");
        step_options o;
        o.scheme = quant_scheme::s8;
        o.implementation = "dense:onednn_s8";
        o.weights_implementation = "ref:any"; // it has no Conv2d backward-weights
        check(o);
    }
}

TEST(S8Scheme, all_zero_and_non_finite_tensors) {
    std::vector<float> z(10, 0.f);
    std::vector<int8_t> q(10, 1);
    EXPECT_EQ(detail::portable::quantize_rne(z.data(), 10, q.data(), nullptr, 1), 0.f);
    EXPECT_TRUE(std::all_of(q.begin(), q.end(), [](int8_t v) { return v == 0; }));
    z[3] = std::nanf("");
    EXPECT_TRUE(std::isnan(detail::portable::quantize_rne(z.data(), 10, q.data(), nullptr, 1)));
    z[3] = INFINITY;
    EXPECT_TRUE(std::isnan(detail::portable::quantize_rne(z.data(), 10, q.data(), nullptr, 1)));
}

// 127 * 127 * 140000 = 2.26e9 > 2^31: a naive int32 accumulator wraps.
TEST(S8Scheme, reduction_longer_than_int32_allows_is_exact) {
    const int64_t L = 140000;
    const double want = 127.0 * 127.0 * L;
    ASSERT_GT(want, 2147483647.0);
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    { // forward: reduction over K
        std::vector<float> dense(L, 1.f), x(L, 1.f), y(1);
        auto w = csr_weights::from_dense(dense.data(), 1, L);
        sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_inference,
                                                 f32_desc({1, L}), w.pattern, f32_desc({1, 1}),
                                                 quant_scheme::s8);
        sparse_linear_forward(pd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), x.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())}});
        EXPECT_EQ(y[0], float(int64_t(want)) * ((1.f / 127.f) * (1.f / 127.f)));
        EXPECT_NEAR(y[0], double(L), 1e-5 * L);
    }
    { // backward-weights: reduction over the batch
        std::vector<float> one(1, 1.f), x(L, 1.f), dy(L, 1.f), dw(1);
        auto w = csr_weights::from_dense(one.data(), 1, 1);
        const auto src_md = f32_desc({L, 1});
        sparse_linear_forward::primitive_desc fwd(eng, prop_kind::forward_training, src_md,
                                                  w.pattern, src_md, quant_scheme::s8);
        std::vector<float> y(L);
        std::vector<uint8_t> ws(fwd.workspace_desc().get_size());
        sparse_linear_forward(fwd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, src_md, x.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, fwd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DST, wrap(eng, src_md, y.data())},
                    {DNNL_ARG_WORKSPACE, wrap(eng, fwd.workspace_desc(), ws.data())}});
        std::vector<int32_t> seed;
        sparse_linear_backward_weights::primitive_desc bwd(eng, src_md, w.pattern,
                                                           dnnl::memory::desc(), src_md, fwd);
        sparse_linear_backward_weights(bwd).execute(
                s, {{DNNL_ARG_WORKSPACE, wrap(eng, fwd.workspace_desc(), ws.data())},
                    {DNNL_ARG_DIFF_DST, wrap(eng, src_md, dy.data())},
                    {DNNL_ARG_DIFF_WEIGHTS, wrap(eng, fwd.weights_desc(), dw.data())},
                    {QSP_ARG_ROUNDING_SEED, seed_memory(eng, seed, 3)}});
        EXPECT_EQ(dw[0], float(int64_t(want)) * ((1.f / 127.f) * (1.f / 127.f)));
    }
    { // conv backward-weights: reduction over N * OH * OW = 375 * 375
        const int64_t H = 375;
        std::vector<float> one(1, 1.f), x(H * H, 1.f), dy(H * H, 1.f), dw(1), y(H * H);
        auto w = csr_weights::from_dense(one.data(), 1, 1);
        const auto md = f32_desc({1, 1, H, H});
        conv2d_geometry g;
        sparse_conv2d_forward::primitive_desc fwd(eng, prop_kind::forward_training, md, w.pattern,
                                                  dnnl::memory::desc(), md, g, quant_scheme::s8);
        std::vector<uint8_t> ws(fwd.workspace_desc().get_size());
        sparse_conv2d_forward(fwd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, md, x.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, fwd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DST, wrap(eng, md, y.data())},
                    {DNNL_ARG_WORKSPACE, wrap(eng, fwd.workspace_desc(), ws.data())}});
        std::vector<int32_t> seed;
        sparse_conv2d_backward_weights::primitive_desc bwd(eng, md, w.pattern, dnnl::memory::desc(),
                                                           md, fwd);
        sparse_conv2d_backward_weights(bwd).execute(
                s, {{DNNL_ARG_WORKSPACE, wrap(eng, fwd.workspace_desc(), ws.data())},
                    {DNNL_ARG_DIFF_DST, wrap(eng, md, dy.data())},
                    {DNNL_ARG_DIFF_WEIGHTS, wrap(eng, fwd.weights_desc(), dw.data())},
                    {QSP_ARG_ROUNDING_SEED, seed_memory(eng, seed, 3)}});
        const double want_conv = 127.0 * 127.0 * H * H;
        EXPECT_EQ(dw[0], float(int64_t(want_conv)) * ((1.f / 127.f) * (1.f / 127.f)));
    }
}

// Conv2d s8 against the same integer model, with the reduction done by a
// naive dense convolution over the quantized integers (exact in double).
TEST(SparseConv2dS8, matches_exact_integer_model) {
    for (auto [groups, stride, pad] :
         {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {2, 2, 0}, {1, 3, 2}}) {
        const int64_t N = 2, C = 4, OC = 6, H = 9, W = 7, KH = 3, KW = 3, icg = C / groups,
                      ocg = OC / groups;
        const int64_t OH = (H + 2 * pad - KH) / stride + 1, OW = (W + 2 * pad - KW) / stride + 1;
        const int64_t cols = icg * KH * KW;
        std::mt19937 rng(static_cast<unsigned>(groups * 100 + stride * 10 + pad));
        auto dense = random_sparse_dense(OC, cols, 0.6, rng);
        auto w = csr_weights::from_dense(dense.data(), OC, cols);
        auto x = random_vector(static_cast<size_t>(N * C * H * W), rng);
        auto dy = random_vector(static_cast<size_t>(N * OC * OH * OW), rng);
        conv2d_geometry g{KH, KW, stride, stride, pad, pad, pad, pad, 1, 1, groups};
        step_options o;
        o.scheme = quant_scheme::s8;
        o.bias = false;
        o.seed = 11;
        const step_result r = training_step(conv2d_layer{N, C, OC, H, W, g}, w, x, dy, {}, o);
        const std::vector<float> &y = r.y, &dx = r.dx, &dw = r.dw;

        const auto xq = model_rne(x);
        const auto wq = model_weight_quant(w.pattern, w.values);
        const auto g1 = model_sr(dy, {}, 1, 1, 11, false);
        const auto g2 = model_sr(dy, wq.scale, OC, OH * OW, 11, true);
        std::vector<int8_t> wqd(static_cast<size_t>(OC * cols), 0);
        for (int64_t r = 0; r < OC; ++r)
            for (int64_t e = w.pattern.row_ptr()[r]; e < w.pattern.row_ptr()[r + 1]; ++e)
                wqd[r * cols + w.pattern.col_idx()[e]] = wq.q[e];
        std::vector<int64_t> yacc(y.size()), dxacc(x.size()), dwacc(wqd.size());
        for (int64_t n = 0; n < N; ++n)
            for (int64_t oc = 0; oc < OC; ++oc)
                for (int64_t oh = 0; oh < OH; ++oh)
                    for (int64_t ow = 0; ow < OW; ++ow)
                        for (int64_t ic = 0; ic < icg; ++ic)
                            for (int64_t kh = 0; kh < KH; ++kh)
                                for (int64_t kw = 0; kw < KW; ++kw) {
                                    const int64_t ih = oh * stride - pad + kh,
                                                  iw = ow * stride - pad + kw;
                                    if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                                    const int64_t yi = ((n * OC + oc) * OH + oh) * OW + ow;
                                    const int64_t xi =
                                            ((n * C + (oc / ocg) * icg + ic) * H + ih) * W + iw;
                                    const int64_t wi = oc * cols + (ic * KH + kh) * KW + kw;
                                    yacc[yi] += int64_t(wqd[wi]) * xq.q[xi];
                                    dxacc[xi] += int64_t(wqd[wi]) * g2.q[yi];
                                    dwacc[wi] += int64_t(g1.q[yi]) * xq.q[xi];
                                }
        std::vector<float> ym(y.size()), dxm(x.size()), dwm(dw.size());
        for (int64_t i = 0; i < static_cast<int64_t>(y.size()); ++i)
            ym[i] = float(yacc[i]) * (xq.scale * wq.scale[(i / (OH * OW)) % OC]) + 0.f;
        for (size_t i = 0; i < x.size(); ++i)
            dxm[i] = float(dxacc[i]) * g2.scale;
        for (int64_t r = 0; r < OC; ++r)
            for (int64_t e = w.pattern.row_ptr()[r]; e < w.pattern.row_ptr()[r + 1]; ++e)
                dwm[e] = float(dwacc[r * cols + w.pattern.col_idx()[e]]) * (g1.scale * xq.scale);
        expect_bitwise_equal(y, ym, "conv forward dst");
        expect_bitwise_equal(dx, dxm, "conv backward_data diff_src");
        expect_bitwise_equal(dw, dwm, "conv backward_weights diff_weights");
    }
}

} // namespace qsp::test
