// The post-op chain of forward primitives (primitive_attr::ops): on Linear
// and Conv2d, f32 and s8, every ISA tier, 1 and 3 threads, odd shapes and
// outputs longer than a pass's chunk, each chain equals the reference
// applied to the same primitive's plain output (relu, add and the mask bit
// for bit; GELU and statistics within rounding of the double reference),
// results do not depend on the thread count, and the refusals name the rule.
#include <cstring>
#include <functional>
#include <stdexcept>

#include "primitives/core/testing_hooks.hpp"
#include "primitives/passes/post_ops.hpp"
#include "test_utils.hpp"

namespace qsp::test {

namespace {

using kind = post_ops::kind;

struct outputs {
    std::vector<float> dst, mean, variance, range;
    std::vector<uint8_t> mask;
};

// One forward execution; `residual` feeds every add post-op. The forward's
// descriptor is built by `make_pd` from attr.
template <typename pd_t, typename prim_t>
outputs run(const std::function<pd_t(const primitive_attr &)> &make_pd,
            const std::vector<kind> &chain, int threads, const std::vector<float> &src,
            const std::vector<float> &values, const std::vector<float> &residual,
            int64_t channels) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream stream(eng);
    primitive_attr attr;
    attr.num_threads = threads;
    for (kind k : chain) {
        if (k == kind::relu) attr.ops.append_relu();
        if (k == kind::gelu_tanh || k == kind::gelu_erf) attr.ops.append_gelu(k == kind::gelu_tanh);
        if (k == kind::add) attr.ops.append_add();
        if (k == kind::batch_statistics) attr.ops.append_batch_statistics();
    }
    const pd_t pd = make_pd(attr);
    const prim_t prim(pd);
    const int64_t n = static_cast<int64_t>(residual.size());
    outputs o;
    o.dst.assign(n, 42.0f);
    o.mask.assign((n + 7) / 8, 0xAB);
    o.mean.assign(channels * chain.size(), 42.0f);
    o.variance.assign(channels * chain.size(), 42.0f);
    o.range.assign(2 * channels * chain.size(), 42.0f);
    std::vector<uint8_t> ws(pd.workspace_desc().get_size());
    exec_args args{{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), src.data())},
                   {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), values.data())},
                   {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), o.dst.data())}};
    if (!ws.empty()) args[DNNL_ARG_WORKSPACE] = wrap(eng, pd.workspace_desc(), ws.data());
    const dnnl::memory::desc per_channel = f32_desc({channels});
    for (int i = 0; i < static_cast<int>(chain.size()); ++i) {
        if (chain[i] == kind::add)
            args[QSP_ARG_POST_OP(i, QSP_POST_OP_SRC)] = wrap(eng, pd.dst_desc(), residual.data());
        if (chain[i] == kind::relu)
            args[QSP_ARG_POST_OP(i, QSP_POST_OP_MASK)] =
                    wrap(eng,
                         dnnl::memory::desc({(n + 7) / 8}, dnnl::memory::data_type::u8,
                                            dnnl::memory::dims{1}),
                         o.mask.data());
        if (chain[i] == kind::batch_statistics) {
            args[QSP_ARG_POST_OP(i, QSP_POST_OP_MEAN)] =
                    wrap(eng, per_channel, o.mean.data() + i * channels);
            args[QSP_ARG_POST_OP(i, QSP_POST_OP_VARIANCE)] =
                    wrap(eng, per_channel, o.variance.data() + i * channels);
            args[QSP_ARG_POST_OP(i, QSP_POST_OP_RANGE)] =
                    wrap(eng, f32_desc({channels, 2}), o.range.data() + 2 * i * channels);
        }
    }
    prim.execute(stream, args);
    return o;
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check(const outputs &got, const outputs &plain, const std::vector<kind> &chain,
           const std::vector<float> &residual, detail::channel_layout layout) {
    outputs want = plain;
    want.mean.assign(layout.channels * chain.size(), 0.0f);
    want.variance.assign(want.mean.size(), 0.0f);
    want.range.assign(2 * want.mean.size(), 0.0f);
    std::vector<detail::post_op_tensors> t(chain.size());
    for (size_t i = 0; i < chain.size(); ++i) {
        t[i].src = residual.data();
        t[i].mask = want.mask.data();
        t[i].mean = want.mean.data() + i * layout.channels;
        t[i].variance = want.variance.data() + i * layout.channels;
        t[i].range = want.range.data() + 2 * i * layout.channels;
    }
    detail::apply_post_ops_reference(chain, t, want.dst.data(), layout);
    const bool has_gelu = std::count(chain.begin(), chain.end(), kind::gelu_tanh)
                          + std::count(chain.begin(), chain.end(), kind::gelu_erf);
    for (size_t i = 0; i < got.dst.size(); ++i) {
        if (has_gelu)
            ASSERT_NEAR(got.dst[i], want.dst[i], 2e-6 * (1 + std::fabs(want.dst[i]))) << i;
        else
            ASSERT_EQ(std::memcmp(&got.dst[i], &want.dst[i], sizeof(float)), 0)
                    << i << ": " << got.dst[i] << " vs " << want.dst[i];
    }
    if (std::count(chain.begin(), chain.end(), kind::relu)) EXPECT_EQ(got.mask, want.mask);
    for (size_t i = 0; i < chain.size(); ++i) {
        if (chain[i] != kind::batch_statistics) continue;
        for (int64_t c = 0; c < layout.channels; ++c) {
            const size_t at = i * layout.channels + c;
            const double v = want.variance[at];
            ASSERT_NEAR(got.mean[at], want.mean[at], 1e-5 * (1 + std::sqrt(v)) + 1e-6) << c;
            ASSERT_NEAR(got.variance[at], v, 1e-4 * v + 1e-6) << c;
            for (size_t e : {2 * at, 2 * at + 1}) // the range exactly
                ASSERT_EQ(got.range[e], want.range[e]) << c << (e % 2 ? " highest" : " lowest");
        }
    }
}

const std::vector<std::vector<kind>> chains = {
        {kind::relu},
        {kind::gelu_tanh},
        {kind::gelu_erf},
        {kind::add, kind::relu},
        {kind::batch_statistics},
        {kind::add, kind::batch_statistics, kind::relu},
        {kind::relu, kind::batch_statistics, kind::gelu_erf},
};

template <typename pd_t, typename prim_t>
void sweep(const std::function<pd_t(const primitive_attr &, quant_scheme)> &make, int64_t src_n,
           int64_t nnz, detail::channel_layout layout, uint32_t seed) {
    std::mt19937 rng(seed);
    const auto src = random_vector(src_n, rng, -2.f, 2.f);
    const auto values = random_vector(nnz, rng);
    const auto residual = random_vector(layout.elements(), rng, -1.f, 1.f);
    for (isa_level isa : isa_levels()) {
        isa_cap_guard guard(isa);
        for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
            const std::function<pd_t(const primitive_attr &)> make_pd =
                    [&](const primitive_attr &a) { return make(a, scheme); };
            const outputs plain =
                    run<pd_t, prim_t>(make_pd, {}, 1, src, values, residual, layout.channels);
            for (const auto &chain : chains) {
                SCOPED_TRACE(testing::Message()
                             << "isa " << to_string(isa) << " scheme " << to_string(scheme)
                             << " chain of " << chain.size() << " from " << to_string(chain[0]));
                const outputs one = run<pd_t, prim_t>(make_pd, chain, 1, src, values, residual,
                                                      layout.channels);
                check(one, plain, chain, residual, layout);
                const outputs three = run<pd_t, prim_t>(make_pd, chain, 3, src, values, residual,
                                                        layout.channels);
                EXPECT_TRUE(same_bits(one.dst, three.dst) && same_bits(one.mean, three.mean)
                            && same_bits(one.variance, three.variance)
                            && same_bits(one.range, three.range) && one.mask == three.mask)
                        << "3 threads differ from 1";
            }
        }
    }
}

} // namespace

TEST(PostOps, linear_chains_match_the_reference_on_every_tier) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    // (batch, in, out): odd sizes, and an output longer than a pass's chunk
    for (auto [b, k, n] : {std::array<int64_t, 3>{1, 3, 17}, {65, 63, 33}, {300, 64, 201}}) {
        std::mt19937 rng(static_cast<uint32_t>(b * 7 + n));
        const auto w = random_sparse_dense(n, k, 0.7, rng);
        const csr_pattern p = csr_pattern::from_dense(w.data(), n, k);
        using pd_t = sparse_linear_forward::primitive_desc;
        sweep<pd_t, sparse_linear_forward>(
                [&](const primitive_attr &a, quant_scheme s) {
                    return pd_t(eng, prop_kind::forward_training, f32_desc({b, k}), p,
                                f32_desc({b, n}), s, a);
                },
                b * k, p.nnz(), {b, n, 1}, 11);
    }
}

TEST(PostOps, conv2d_chains_match_the_reference_on_every_tier) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    for (auto [batch, c, oc, hw] : {std::array<int64_t, 4>{1, 3, 5, 7}, {3, 4, 6, 65}}) {
        std::mt19937 rng(static_cast<uint32_t>(c * 13 + hw));
        const auto w = random_sparse_dense(oc, c * 9, 0.6, rng);
        const csr_pattern p = csr_pattern::from_dense(w.data(), oc, c * 9);
        conv2d_geometry g = same_3x3();
        using pd_t = sparse_conv2d_forward::primitive_desc;
        sweep<pd_t, sparse_conv2d_forward>(
                [&](const primitive_attr &a, quant_scheme s) {
                    return pd_t(eng, prop_kind::forward_training, f32_desc({batch, c, hw, hw}), p,
                                dnnl::memory::desc(), f32_desc({batch, oc, hw, hw}), g, s, a);
                },
                batch * c * hw * hw, p.nnz(), {batch, oc, hw * hw}, 12);
    }
}

// The output-width kernels take a first batch_statistics post-op while they
// write dst (AVX-512, planes of 512 outputs or more; else the core's pass):
// the same statistics within rounding, the range exactly, thread-count
// independent, over odd widths (a masked tail vector, several vectors, rows
// left after the blocks of 4), stride 2, an image wider than one kernel
// call covers (several chunks per row), and a small plane (the pass).
TEST(PostOps, conv2d_output_width_kernels_take_batch_statistics_in_their_epilogue) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    struct shape {
        int64_t batch, c, oc, h, w, stride;
    };
    for (const shape s :
         {shape{2, 3, 5, 23, 23, 1}, shape{3, 4, 6, 17, 33, 1}, shape{2, 5, 7, 47, 47, 2},
          shape{1, 2, 3, 31, 17, 1}, shape{1, 1, 2, 3, 700, 1}, shape{2, 3, 5, 7, 7, 1}}) {
        SCOPED_TRACE(testing::Message() << s.batch << "x" << s.c << "x" << s.h << "x" << s.w
                                        << " -> " << s.oc << " stride " << s.stride);
        std::mt19937 rng(static_cast<uint32_t>(s.c * 13 + s.w));
        const auto w = random_sparse_dense(s.oc, s.c * 9, 0.6, rng);
        const csr_pattern p = csr_pattern::from_dense(w.data(), s.oc, s.c * 9);
        conv2d_geometry g = same_3x3();
        g.stride_h = g.stride_w = s.stride;
        const auto out = conv2d_output_hw(g, s.h, s.w);
        using pd_t = sparse_conv2d_forward::primitive_desc;
        const int64_t before = detail::epilogue_statistics_taken_for_testing();
        sweep<pd_t, sparse_conv2d_forward>(
                [&](primitive_attr a, quant_scheme q) {
                    a.vectorization = conv_vectorization::output_width;
                    return pd_t(eng, prop_kind::forward_training,
                                f32_desc({s.batch, s.c, s.h, s.w}), p, dnnl::memory::desc(),
                                f32_desc({s.batch, s.oc, out[0], out[1]}), g, q, a);
                },
                s.batch * s.c * s.h * s.w, p.nnz(), {s.batch, s.oc, out[0] * out[1]}, 13);
        // on AVX-512 the kernels took them (each tier, scheme and thread
        // count that ran the chain starting with the statistics), from
        // planes of 512 outputs on
        if (detected_cpu_isa() >= cpu_isa::avx512_core && out[0] * out[1] >= 512)
            EXPECT_GT(detail::epilogue_statistics_taken_for_testing(), before);
        else
            EXPECT_EQ(detail::epilogue_statistics_taken_for_testing(), before);
        // every output of one sign (a dense positive x, dense weights of
        // that sign): a lane past a row's end (a zero there) counted in the
        // range would show as a 0
        for (float sign : {1.0f, -1.0f}) {
            const auto ones = std::vector<float>(s.oc * s.c * 9, 1.0f);
            const csr_pattern dense = csr_pattern::from_dense(ones.data(), s.oc, s.c * 9);
            std::vector<float> x = random_vector(s.batch * s.c * s.h * s.w, rng, 0.5f, 2.0f),
                               values = random_vector(dense.nnz(), rng, 0.1f, 1.0f);
            for (float &v : values)
                v *= sign;
            const std::vector<float> unused(s.batch * s.oc * out[0] * out[1]);
            for (quant_scheme q : {quant_scheme::f32, quant_scheme::s8}) {
                const std::function<pd_t(const primitive_attr &)> make_pd =
                        [&](const primitive_attr &attr) {
                            primitive_attr a = attr;
                            a.vectorization = conv_vectorization::output_width;
                            return pd_t(eng, prop_kind::forward_training,
                                        f32_desc({s.batch, s.c, s.h, s.w}), dense,
                                        dnnl::memory::desc(),
                                        f32_desc({s.batch, s.oc, out[0], out[1]}), g, q, a);
                        };
                const outputs plain =
                        run<pd_t, sparse_conv2d_forward>(make_pd, {}, 1, x, values, unused, s.oc);
                const outputs got = run<pd_t, sparse_conv2d_forward>(
                        make_pd, {kind::batch_statistics}, 2, x, values, unused, s.oc);
                check(got, plain, {kind::batch_statistics}, unused,
                      {s.batch, s.oc, out[0] * out[1]});
            }
        }
    }
}

TEST(PostOps, refusals_name_the_rule) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream stream(eng);
    std::mt19937 rng(5);
    const auto w = random_sparse_dense(6, 5, 0.5, rng);
    const csr_pattern p = csr_pattern::from_dense(w.data(), 6, 5);
    primitive_attr with_ops;
    with_ops.ops.append_add();
    using fwd_pd = sparse_linear_forward::primitive_desc;
    const fwd_pd hint(eng, prop_kind::forward_training, f32_desc({4, 5}), p, f32_desc({4, 6}),
                      quant_scheme::f32);
    try {
        sparse_linear_backward_data::primitive_desc(eng, f32_desc({4, 5}), p, f32_desc({4, 6}),
                                                    hint, with_ops);
        ADD_FAILURE() << "a backward descriptor with post-ops was accepted";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find("post-ops apply to forward primitives"),
                  std::string::npos)
                << e.what();
    }
    const fwd_pd pd(eng, prop_kind::forward_training, f32_desc({4, 5}), p, f32_desc({4, 6}),
                    quant_scheme::f32, with_ops);
    std::vector<float> src(20, 1.0f), values(p.nnz(), 1.0f), dst(24);
    const sparse_linear_forward prim(pd);
    try {
        prim.execute(stream, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), src.data())},
                              {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), values.data())},
                              {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), dst.data())}});
        ADD_FAILURE() << "an add post-op without its src was accepted";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find("post-op add src is required"), std::string::npos)
                << e.what();
    }
    // relu's mask is optional
    primitive_attr relu_only;
    relu_only.ops.append_relu();
    const fwd_pd plain_pd(eng, prop_kind::forward_training, f32_desc({4, 5}), p, f32_desc({4, 6}),
                          quant_scheme::f32);
    const fwd_pd relu_pd(eng, prop_kind::forward_training, f32_desc({4, 5}), p, f32_desc({4, 6}),
                         quant_scheme::f32, relu_only);
    for (float &v : src)
        v = std::uniform_real_distribution<float>(-1, 1)(rng);
    std::vector<float> plain(24), relu(24);
    const auto exec = [&](const fwd_pd &d, std::vector<float> &out) {
        sparse_linear_forward(d).execute(
                stream, {{DNNL_ARG_SRC, wrap(eng, d.src_desc(), src.data())},
                         {DNNL_ARG_WEIGHTS, wrap(eng, d.weights_desc(), values.data())},
                         {DNNL_ARG_DST, wrap(eng, d.dst_desc(), out.data())}});
    };
    exec(plain_pd, plain);
    exec(relu_pd, relu);
    for (size_t i = 0; i < plain.size(); ++i)
        EXPECT_EQ(relu[i], plain[i] < 0 ? 0.0f : plain[i]) << i;
}

} // namespace qsp::test
