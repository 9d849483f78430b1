// qsp::sparse_backward (backward-data + backward-weights in one execution,
// sharing the packed output gradient) against the two primitives run
// separately: the same bits, every tier, both schemes, Linear and Conv2d;
// and it refuses descriptors of different layers or shapes.
#include <cstring>

#include "test_utils.hpp"

namespace qsp::test {

namespace {

template <typename fn_t> void expect_refusal(fn_t fn, const std::string &needle) {
    try {
        fn();
        ADD_FAILURE() << "expected a refusal mentioning '" << needle << "'";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

void expect_same_bits(const std::vector<float> &a, const std::vector<float> &b, const char *what) {
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
}

struct grads {
    std::vector<float> dx, dw, db;
    std::string impl;
};

// Backward of one layer, fused or as two primitives. make_fwd(attr) gives
// the forward descriptor; the rest is generic over Linear / Conv2d.
template <typename fwd_t, typename bd_t, typename bw_t, typename make_fwd_t>
grads backward(make_fwd_t make_fwd, const csr_weights &w, const dnnl::memory::desc &src_md,
               const dnnl::memory::desc &dst_md, const dnnl::memory::desc &bias_md,
               const std::vector<float> &x, const std::vector<float> &dy, bool fused) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    const typename fwd_t::primitive_desc fwd = make_fwd(eng);
    std::vector<float> y(dy.size());
    std::vector<uint8_t> ws(std::max<size_t>(fwd.workspace_desc().get_size(), 1));
    const auto wmd = fwd.weights_desc();
    std::vector<float> bias(static_cast<size_t>(bias_md.get_dims()[0]), 0.5f);
    exec_args fa{{DNNL_ARG_SRC, wrap(eng, src_md, x.data())},
                 {DNNL_ARG_WEIGHTS, wrap(eng, wmd, w.values.data())},
                 {DNNL_ARG_BIAS, wrap(eng, bias_md, bias.data())},
                 {DNNL_ARG_DST, wrap(eng, dst_md, y.data())}};
    if (fwd.scheme() == quant_scheme::s8)
        fa[DNNL_ARG_WORKSPACE] = wrap(eng, fwd.workspace_desc(), ws.data());
    fwd_t(fwd).execute(s, fa);
    typename bd_t::primitive_desc bd(eng, src_md, w.pattern, dst_md, fwd);
    typename bw_t::primitive_desc bw(eng, src_md, w.pattern, bias_md, dst_md, fwd);
    grads g;
    g.dx.assign(x.size(), NAN);
    g.dw.assign(w.values.size(), NAN);
    g.db.assign(bias.size(), NAN);
    std::vector<int32_t> seed;
    exec_args args{{DNNL_ARG_DIFF_DST, wrap(eng, dst_md, dy.data())},
                   {DNNL_ARG_WEIGHTS, wrap(eng, wmd, w.values.data())},
                   {DNNL_ARG_DIFF_SRC, wrap(eng, src_md, g.dx.data())},
                   {DNNL_ARG_DIFF_WEIGHTS, wrap(eng, wmd, g.dw.data())},
                   {DNNL_ARG_DIFF_BIAS, wrap(eng, bias_md, g.db.data())},
                   {QSP_ARG_ROUNDING_SEED, seed_memory(eng, seed, 77)}};
    if (fwd.scheme() == quant_scheme::s8)
        args[DNNL_ARG_WORKSPACE] = wrap(eng, fwd.workspace_desc(), ws.data());
    else
        args[DNNL_ARG_SRC] = wrap(eng, src_md, x.data());
    if (fused) {
        sparse_backward<bd_t, bw_t> both(bd, bw);
        g.impl = both.impl_info_str();
        both.execute(s, args);
    } else {
        bd_t(bd).execute(s, args);
        bw_t(bw).execute(s, args);
    }
    return g;
}

} // namespace

TEST(FusedBackward, linear_equals_the_two_primitives_on_every_tier) {
    std::mt19937 rng(3);
    for (int64_t batch : {1, 17, 70}) {
        const int64_t K = 33, N = 65;
        auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.8, rng).data(), N, K);
        auto x = random_vector(static_cast<size_t>(batch * K), rng);
        auto dy = random_vector(static_cast<size_t>(batch * N), rng);
        const auto src_md = f32_desc({batch, K}), dst_md = f32_desc({batch, N}),
                   bias_md = f32_desc({N});
        for (cpu_isa isa : isa_levels())
            for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(scheme) + " batch "
                             + std::to_string(batch));
                auto make = [&](const dnnl::engine &eng) {
                    return sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                                 src_md, w.pattern, bias_md, dst_md,
                                                                 scheme);
                };
                const grads a = backward<sparse_linear_forward, sparse_linear_backward_data,
                                         sparse_linear_backward_weights>(make, w, src_md, dst_md,
                                                                         bias_md, x, dy, false);
                const grads b = backward<sparse_linear_forward, sparse_linear_backward_data,
                                         sparse_linear_backward_weights>(make, w, src_md, dst_md,
                                                                         bias_md, x, dy, true);
                expect_same_bits(b.dx, a.dx, "diff_src");
                expect_same_bits(b.dw, a.dw, "diff_weights");
                expect_same_bits(b.db, a.db, "diff_bias");
                EXPECT_NE(b.impl.find('/'), std::string::npos);
            }
    }
}

TEST(FusedBackward, conv2d_equals_the_two_primitives_on_every_tier) {
    std::mt19937 rng(4);
    conv2d_geometry g;
    g.kernel_h = g.kernel_w = 3;
    g.pad_top = g.pad_bottom = g.pad_left = g.pad_right = 1;
    g.stride_w = 2;
    const int64_t B = 3, C = 5, OC = 6, H = 9, W = 8;
    const auto o = conv2d_output_hw(g, H, W);
    auto w = csr_weights::from_dense(random_sparse_dense(OC, C * 9, 0.7, rng).data(), OC, C * 9);
    auto x = random_vector(static_cast<size_t>(B * C * H * W), rng);
    auto dy = random_vector(static_cast<size_t>(B * OC * o[0] * o[1]), rng);
    const auto src_md = f32_desc({B, C, H, W}), dst_md = f32_desc({B, OC, o[0], o[1]}),
               bias_md = f32_desc({OC});
    for (cpu_isa isa : isa_levels())
        for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
            isa_cap_guard cap(isa);
            SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(scheme));
            auto make = [&](const dnnl::engine &eng) {
                return sparse_conv2d_forward::primitive_desc(eng, prop_kind::forward_training,
                                                             src_md, w.pattern, bias_md, dst_md, g,
                                                             scheme);
            };
            const grads a = backward<sparse_conv2d_forward, sparse_conv2d_backward_data,
                                     sparse_conv2d_backward_weights>(make, w, src_md, dst_md,
                                                                     bias_md, x, dy, false);
            const grads b = backward<sparse_conv2d_forward, sparse_conv2d_backward_data,
                                     sparse_conv2d_backward_weights>(make, w, src_md, dst_md,
                                                                     bias_md, x, dy, true);
            expect_same_bits(b.dx, a.dx, "diff_src");
            expect_same_bits(b.dw, a.dw, "diff_weights");
            expect_same_bits(b.db, a.db, "diff_bias");
        }
}

TEST(FusedBackward, refuses_descriptors_of_another_layer_or_shape) {
    std::mt19937 rng(5);
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    auto w1 = csr_weights::from_dense(random_sparse_dense(4, 6, 0.5, rng).data(), 4, 6);
    auto w2 = csr_weights::from_dense(random_sparse_dense(4, 6, 0.5, rng).data(), 4, 6);
    auto fwd = [&](const csr_weights &w, int64_t batch) {
        return sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                     f32_desc({batch, 6}), w.pattern,
                                                     f32_desc({batch, 4}), quant_scheme::f32);
    };
    const auto f1 = fwd(w1, 2), f2 = fwd(w2, 2), f3 = fwd(w1, 3);
    sparse_linear_backward_data::primitive_desc bd(eng, f32_desc({2, 6}), w1.pattern,
                                                   f32_desc({2, 4}), f1);
    sparse_linear_backward_weights::primitive_desc other_layer(
            eng, f32_desc({2, 6}), w2.pattern, dnnl::memory::desc(), f32_desc({2, 4}), f2);
    sparse_linear_backward_weights::primitive_desc other_batch(
            eng, f32_desc({3, 6}), w1.pattern, dnnl::memory::desc(), f32_desc({3, 4}), f3);
    expect_refusal([&] { sparse_linear_backward(bd, other_layer); }, "different weight patterns");
    expect_refusal([&] { sparse_linear_backward(bd, other_batch); }, "different shapes");
}

} // namespace qsp::test
