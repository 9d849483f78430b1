// Descriptor and execution refusals: each names the argument and the rule.
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>

#include "test_utils.hpp"

namespace qsp::test {

namespace {

csr_pattern small_pattern(int64_t rows, int64_t cols) {
    std::mt19937 rng(3);
    auto d = random_sparse_dense(rows, cols, 0.5, rng);
    return csr_pattern::from_dense(d.data(), rows, cols);
}
} // namespace

TEST(PrimitiveApi, linear_descriptor_refusals) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    auto p = small_pattern(6, 5);
    using pd_t = sparse_linear_forward::primitive_desc;
    auto fwd = prop_kind::forward_training;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({4, 7}), p, f32_desc({4, 6}), quant_scheme::f32);
            },
            "src_desc has 7 in_features but the weights pattern has 5");
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({4, 5, 1}), p, f32_desc({4, 6}), quant_scheme::f32);
            },
            "src_desc is 3-D but not the kept layout");
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({4, 5}), p, f32_desc({4, 7}), quant_scheme::f32);
            },
            "dst_desc must have dims");
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({4, 5}), p, f32_desc({5}), f32_desc({4, 6}),
                     quant_scheme::f32);
            },
            "bias_desc must have dims");
    dnnl::memory::desc s8_md({4, 5}, dnnl::memory::data_type::s8, dnnl::memory::format_tag::ab);
    expect_refusal(
            [&] {
                pd_t(eng, fwd, s8_md, p, f32_desc({4, 6}), quant_scheme::f32);
            },
            "must be f32");
    dnnl::memory::desc col_major({4, 5}, dnnl::memory::data_type::f32,
                                 dnnl::memory::format_tag::ba);
    expect_refusal(
            [&] {
                pd_t(eng, fwd, col_major, p, f32_desc({4, 6}), quant_scheme::f32);
            },
            "row-major");
    primitive_attr bad;
    bad.num_threads = -2;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({4, 5}), p, f32_desc({4, 6}), quant_scheme::f32, bad);
            },
            "num_threads");
    // A team far beyond the machine crashed inside libgomp (70 000): refused.
    bad.num_threads = max_num_threads() + 1;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({4, 5}), p, f32_desc({4, 6}), quant_scheme::f32, bad);
            },
            "num_threads must be in [0, " + std::to_string(max_num_threads()) + "]");
    bad.num_threads = max_num_threads();
    EXPECT_NO_THROW(pd_t(eng, fwd, f32_desc({4, 5}), p, f32_desc({4, 6}), quant_scheme::f32, bad));
    // Backward with a hint for another pattern.
    pd_t hint(eng, fwd, f32_desc({4, 5}), p, f32_desc({4, 6}), quant_scheme::f32);
    expect_refusal(
            [&] {
                sparse_linear_backward_data::primitive_desc(
                        eng, f32_desc({4, 5}),
                        small_pattern(6, 5).hash() == p.hash()
                                ? csr_pattern::from_indices(6, 5, {0, 0, 0, 0, 0, 0, 0}, {})
                                : p,
                        f32_desc({4, 6}), hint);
            },
            "differs from the one of the forward hint");
    pd_t inference(eng, prop_kind::forward_inference, f32_desc({4, 5}), p, f32_desc({4, 6}),
                   quant_scheme::s8);
    expect_refusal(
            [&] {
                sparse_linear_backward_weights::primitive_desc(eng, f32_desc({4, 5}), p,
                                                               dnnl::memory::desc(),
                                                               f32_desc({4, 6}), inference);
            },
            "forward_training hint");
}

TEST(PrimitiveApi, conv_descriptor_refusals) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    auto p = small_pattern(4, 2 * 3 * 3);
    using pd_t = sparse_conv2d_forward::primitive_desc;
    auto fwd = prop_kind::forward_training;
    conv2d_geometry g{3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    auto ok_dst = f32_desc({1, 4, 5, 5});
    auto none = dnnl::memory::desc();
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({1, 3, 5, 5}), p, none, ok_dst, g, quant_scheme::f32);
            },
            "weights pattern has 18 columns but C/groups * KH * KW = 27");
    auto g2 = g;
    g2.groups = 3;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({1, 2, 5, 5}), p, none, ok_dst, g2, quant_scheme::f32);
            },
            "divisible by groups");
    auto g3 = g;
    g3.stride_h = 0;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({1, 2, 5, 5}), p, none, ok_dst, g3, quant_scheme::f32);
            },
            "stride_h must be >= 1, got 0");
    auto g4 = g;
    g4.dilation_w = 0;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({1, 2, 5, 5}), p, none, ok_dst, g4, quant_scheme::f32);
            },
            "dilation_w");
    auto g5 = g;
    g5.pad_top = g5.pad_bottom = g5.pad_left = g5.pad_right = 0;
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({1, 2, 2, 2}), p, none, f32_desc({1, 4, 1, 1}), g5,
                     quant_scheme::f32);
            },
            "smaller than the dilated kernel 3x3");
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({1, 2, 5, 5}), p, none, f32_desc({1, 4, 3, 3}), g,
                     quant_scheme::f32);
            },
            "dst_desc must have dims");
    expect_refusal(
            [&] {
                pd_t(eng, fwd, f32_desc({2, 5, 5}), p, none, ok_dst, g, quant_scheme::f32);
            },
            "must be 4-D");
}

// Every geometry check happens before anything is computed from the
// geometry (a stride of 0 must be an error, not a division by zero).
TEST(PrimitiveApi, conv_geometry_is_checked_before_use) {
    conv2d_geometry ok{3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    EXPECT_NO_THROW(check_conv2d_geometry(ok, 4, 8));
    EXPECT_EQ(conv2d_output_hw(ok, 5, 7), (std::array<int64_t, 2>{5, 7}));
    struct bad_case {
        std::function<void(conv2d_geometry &)> change;
        const char *needle;
    };
    for (const bad_case &c : std::vector<bad_case>{
                 {[](conv2d_geometry &g) { g.stride_w = 0; }, "stride_w must be >= 1, got 0"},
                 {[](conv2d_geometry &g) { g.stride_h = -2; }, "stride_h must be >= 1, got -2"},
                 {[](conv2d_geometry &g) { g.pad_left = -1; }, "pad_left must be >= 0, got -1"},
                 {[](conv2d_geometry &g) { g.pad_bottom = -3; }, "pad_bottom must be >= 0"},
                 {[](conv2d_geometry &g) { g.dilation_h = 0; }, "dilation_h must be >= 1"},
                 {[](conv2d_geometry &g) { g.kernel_w = 0; }, "kernel_w must be >= 1"},
                 {[](conv2d_geometry &g) { g.groups = 0; }, "groups must be >= 1, got 0"},
                 {[](conv2d_geometry &g) { g.groups = 3; },
                  "in_channels (4) must be divisible by groups (3)"},
                 {[](conv2d_geometry &g) { g.stride_h = int64_t(1) << 40; },
                  "stride_h must be <= 2^31"},
         }) {
        conv2d_geometry g = ok;
        c.change(g);
        expect_refusal([&] { check_conv2d_geometry(g, 4, 8); }, c.needle);
        if (g.groups != 3) expect_refusal([&] { conv2d_output_hw(g, 5, 7); }, c.needle);
    }
    conv2d_geometry g = ok;
    g.groups = 2;
    expect_refusal([&] { check_conv2d_geometry(g, 4, 6 + 1); },
                   "out_channels (7) must be divisible by groups (2)");
    expect_refusal([&] { conv2d_output_hw(ok, 0, 7); },
                   "input height and width must be in [1, 2^31]");
    // ... and through a descriptor, named as the descriptor's refusal.
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    auto p = small_pattern(4, 2 * 3 * 3);
    conv2d_geometry zero_stride = ok;
    zero_stride.stride_w = 0;
    expect_refusal(
            [&] {
                sparse_conv2d_forward::primitive_desc(eng, prop_kind::forward_training,
                                                      f32_desc({1, 2, 5, 5}), p,
                                                      dnnl::memory::desc(), f32_desc({1, 4, 5, 5}),
                                                      zero_stride, quant_scheme::s8);
            },
            "sparse_conv2d_forward: conv2d geometry: stride_w must be >= 1, got 0");
}

TEST(PrimitiveApi, forced_implementation) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    auto p = small_pattern(6, 5);
    primitive_attr attr;
    attr.implementation = "ref:any";
    sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_training, f32_desc({4, 5}), p,
                                             f32_desc({4, 6}), quant_scheme::s8, attr);
    EXPECT_EQ(pd.impl_info_str(), "ref:any");
    sparse_linear_backward_data::primitive_desc bd(eng, f32_desc({4, 5}), p, f32_desc({4, 6}), pd,
                                                   attr);
    EXPECT_EQ(bd.impl_info_str(), "ref:any");
    EXPECT_EQ(bd.num_threads(), pd.num_threads()) << "the hint's team size by default";
    attr.implementation = "dense:onednn_s8";
    expect_refusal(
            [&] {
                sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                      f32_desc({4, 5}), p, f32_desc({4, 6}),
                                                      quant_scheme::f32, attr);
            },
            "attr.implementation 'dense:onednn_s8' cannot run this problem: s8 only");
    attr.implementation = "jit:magic";
    expect_refusal(
            [&] {
                sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                      f32_desc({4, 5}), p, f32_desc({4, 6}),
                                                      quant_scheme::f32, attr);
            },
            "attr.implementation 'jit:magic' is not an implementation of this operation (known: "
            "jit:avx512_core:pattern, jit:avx512_core, jit:avx2:pattern, jit:avx2, "
            "jit:avx512_core_vnni:pattern, jit:avx512_core_vnni, dense:onednn_s8, ref:any)");
}

TEST(PrimitiveApi, execute_refusals_and_verbose) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    auto p = small_pattern(6, 5);
    sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_training, f32_desc({4, 5}), p,
                                             f32_desc({4, 6}), quant_scheme::s8);
    // s8: the reference, or whichever of the tier's JIT (generic or the
    // layer's specialised code) and oneDNN's int8 matmul measured faster.
    const std::string s8_impl = pd.impl_info_str();
    const std::string s8_jit = effective_cpu_isa() < cpu_isa::avx512_core ? "jit:avx2"
                               : effective_cpu_isa() < cpu_isa::avx512_core_vnni
                                       ? "jit:avx512_core"
                                       : "jit:avx512_core_vnni";
    if (effective_cpu_isa() == cpu_isa::ref)
        EXPECT_EQ(s8_impl, "ref:any");
    else
        EXPECT_TRUE(s8_impl == "dense:onednn_s8" || s8_impl == s8_jit
                    || s8_impl == s8_jit + ":pattern")
                << s8_impl;
    EXPECT_FALSE(pd.workspace_desc().is_zero());
    std::vector<float> x(20, 1.f), y(24), v(static_cast<size_t>(p.nnz()), 1.f), wrong(30);
    std::vector<uint8_t> ws(pd.workspace_desc().get_size());
    sparse_linear_forward prim(pd);
    expect_refusal(
            [&] {
                prim.execute(s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), x.data())},
                                 {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())},
                                 {DNNL_ARG_WORKSPACE, wrap(eng, pd.workspace_desc(), ws.data())}});
            },
            "argument weights is required");
    expect_refusal(
            [&] {
                prim.execute(s, {{DNNL_ARG_SRC, wrap(eng, f32_desc({6, 5}), wrong.data())},
                                 {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), v.data())},
                                 {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())},
                                 {DNNL_ARG_WORKSPACE, wrap(eng, pd.workspace_desc(), ws.data())}});
            },
            "argument src does not match");
    expect_refusal(
            [&] {
                prim.execute(s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), x.data())},
                                 {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), v.data())},
                                 {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())}});
            },
            "argument workspace is required");

    set_verbose_level(2);
    testing::internal::CaptureStdout();
    sparse_linear_forward::primitive_desc pd_s8(eng, prop_kind::forward_training, f32_desc({4, 5}),
                                                p, f32_desc({4, 6}), quant_scheme::s8);
    prim.execute(s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), x.data())},
                     {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), v.data())},
                     {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())},
                     {DNNL_ARG_WORKSPACE, wrap(eng, pd.workspace_desc(), ws.data())}});
    sparse_linear_forward::primitive_desc pd2(eng, prop_kind::forward_inference, f32_desc({2, 5}),
                                              p, f32_desc({2, 6}), quant_scheme::f32);
    const std::string before_primitive = testing::internal::GetCapturedStdout();
    testing::internal::CaptureStdout();
    sparse_linear_forward prim2(pd2); // plans and code are built here, not by the descriptor
    const std::string out = before_primitive + testing::internal::GetCapturedStdout();
    EXPECT_EQ(before_primitive.find("qsp_verbose,create,sparse_linear_forward,jit"),
              std::string::npos)
            << before_primitive;
    set_verbose_level(0);
    EXPECT_NE(out.find("qsp_verbose,exec,sparse_linear_forward," + s8_impl + ",s8,mb4ic5oc6"),
              std::string::npos)
            << out;
    // the first in list order: the layer's specialised code
    const std::string f32_impl = effective_cpu_isa() >= cpu_isa::avx512_core
                                         ? "jit:avx512_core:pattern"
                                 : effective_cpu_isa() == cpu_isa::avx2 ? "jit:avx2:pattern"
                                                                        : "ref:any";
    EXPECT_NE(out.find("qsp_verbose,create,sparse_linear_forward," + f32_impl + ",f32,mb2ic5oc6"),
              std::string::npos)
            << out;
    // dispatch level: why the JIT did not take the s8 problem
    EXPECT_NE(out.find("qsp_verbose,dispatch,sparse_linear_forward,jit:avx512_core,skipped: f32 "
                       "only\n"),
              std::string::npos)
            << out;
}

// src given quantized (QSP_ARG_SRC_S8) and diff_dst given as a BatchNorm's
// backward (QSP_ARG_BN_*) change what an execution reads: where the
// primitive does not take them (f32, Linear) they are refused, not ignored;
// the integers go with their scale; a forward needs src or them; and
// inference with them (no workspace) computes what it computes from src.
TEST(PrimitiveApi, src_given_quantized_is_taken_or_refused) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    std::mt19937 rng(3);
    const conv2d_geometry g = same_3x3();
    const dnnl::memory::desc src_md = f32_desc({2, 3, 5, 6}), dst_md = f32_desc({2, 4, 5, 6});
    const dnnl::memory::desc q_md({2, 3, 5, 6}, dnnl::memory::data_type::s8, src_md.get_strides());
    auto w = csr_weights::from_dense(random_sparse_dense(4, 27, 0.6, rng).data(), 4, 27);
    const auto x = random_vector(2 * 3 * 5 * 6, rng);
    float peak = 0.f;
    for (float v : x)
        peak = std::max(peak, std::fabs(v));
    const quant_scale rule = quant_scale_from_abs_max(peak);
    std::vector<int8_t> q(x.size());
    for (size_t i = 0; i < x.size(); ++i)
        q[i] = static_cast<int8_t>(std::nearbyint(x[i] * rule.inv));
    float scale = rule.scale;
    std::vector<float> y(2 * 4 * 30, NAN), from_src(y.size(), NAN);
    for (prop_kind prop : {prop_kind::forward_inference, prop_kind::forward_training}) {
        const sparse_conv2d_forward::primitive_desc pd(
                eng, prop, src_md, w.pattern, dnnl::memory::desc(), dst_md, g, quant_scheme::s8);
        std::vector<uint8_t> ws(std::max<size_t>(pd.workspace_desc().get_size(), 1));
        exec_args args{{DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                       {DNNL_ARG_DST, wrap(eng, dst_md, y.data())}};
        if (prop == prop_kind::forward_training)
            args[DNNL_ARG_WORKSPACE] = wrap(eng, pd.workspace_desc(), ws.data());
        else
            expect_refusal([&] { (void)pd.workspace_src_s8_offset(); }, "no workspace");
        const sparse_conv2d_forward prim(pd);
        expect_refusal([&] { prim.execute(s, args); }, "argument src is required");
        args[QSP_ARG_SRC_S8] = wrap(eng, q_md, q.data());
        expect_refusal([&] { prim.execute(s, args); }, "src_s8 and src_s8_scale go together");
        args[QSP_ARG_SRC_S8_SCALE] = wrap(eng, f32_desc({1}), &scale);
        prim.execute(s, args);
        exec_args plain = args;
        plain.erase(QSP_ARG_SRC_S8);
        plain.erase(QSP_ARG_SRC_S8_SCALE);
        plain[DNNL_ARG_SRC] = wrap(eng, src_md, x.data());
        plain[DNNL_ARG_DST] = wrap(eng, dst_md, from_src.data());
        prim.execute(s, plain);
        EXPECT_EQ(std::memcmp(y.data(), from_src.data(), y.size() * sizeof(float)), 0)
                << (prop == prop_kind::forward_training ? "training" : "inference");
    }
    // f32 takes no quantized src, Linear none either; neither a BatchNorm's dY
    const sparse_conv2d_forward::primitive_desc f32_pd(eng, prop_kind::forward_training, src_md,
                                                       w.pattern, dnnl::memory::desc(), dst_md, g,
                                                       quant_scheme::f32);
    exec_args args{{DNNL_ARG_SRC, wrap(eng, src_md, x.data())},
                   {DNNL_ARG_WEIGHTS, wrap(eng, f32_pd.weights_desc(), w.values.data())},
                   {DNNL_ARG_DST, wrap(eng, dst_md, y.data())},
                   {QSP_ARG_SRC_S8, wrap(eng, q_md, q.data())},
                   {QSP_ARG_SRC_S8_SCALE, wrap(eng, f32_desc({1}), &scale)}};
    expect_refusal([&] { sparse_conv2d_forward(f32_pd).execute(s, args); },
                   "src_s8 (s8 Conv2d forward only) is not taken by this primitive (f32)");
    expect_refusal([&] { (void)f32_pd.workspace_src_s8_offset(); }, "no workspace");
    const sparse_conv2d_backward_data::primitive_desc bd(eng, src_md, w.pattern, dst_md, f32_pd);
    std::vector<float> dy(y.size(), 1.f), dx(x.size());
    exec_args bargs{{DNNL_ARG_DIFF_DST, wrap(eng, dst_md, dy.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, f32_pd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DIFF_SRC, wrap(eng, src_md, dx.data())},
                    {QSP_ARG_BN_DIFF_DST, wrap(eng, dst_md, dy.data())}};
    expect_refusal([&] { sparse_conv2d_backward_data(bd).execute(s, bargs); },
                   "bn_diff_dst (s8 Conv2d backward only) is not taken");
}

TEST(PrimitiveApi, s8_backward_data_reads_the_forwards_quantized_weights) {
    // The s8 step quantizes the weights once: backward-data takes the
    // forward's workspace (where Wq and its scales are) instead of the
    // weights, and its descriptor describes the same workspace.
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    auto w = csr_weights{csr_pattern::from_indices(2, 3, {0, 2, 3}, {0, 2, 1}), {1.f, -2.f, 3.f}};
    for (quant_scheme scheme : {quant_scheme::s8, quant_scheme::f32}) {
        SCOPED_TRACE(to_string(scheme));
        const bool s8 = scheme == quant_scheme::s8;
        sparse_linear_forward::primitive_desc fwd(eng, prop_kind::forward_training,
                                                  f32_desc({4, 3}), w.pattern, f32_desc({4, 2}),
                                                  scheme);
        sparse_linear_backward_data::primitive_desc bd(eng, f32_desc({4, 3}), w.pattern,
                                                       f32_desc({4, 2}), fwd);
        EXPECT_EQ(bd.workspace_desc(), fwd.workspace_desc());
        EXPECT_EQ(bd.workspace_desc().is_zero(), !s8);
        std::vector<float> dy(8, 0.5f), dx(12, NAN);
        std::vector<int32_t> seed{3, 4};
        std::vector<uint8_t> ws(std::max<size_t>(fwd.workspace_desc().get_size(), 1));
        const exec_args only_weights{
                {DNNL_ARG_DIFF_DST, wrap(eng, f32_desc({4, 2}), dy.data())},
                {DNNL_ARG_WEIGHTS, wrap(eng, bd.weights_desc(), w.values.data())},
                {DNNL_ARG_DIFF_SRC, wrap(eng, f32_desc({4, 3}), dx.data())},
                {QSP_ARG_ROUNDING_SEED, dnnl::memory(rounding_seed_desc(), eng, seed.data())}};
        if (!s8) {
            sparse_linear_backward_data(bd).execute(s, only_weights);
            EXPECT_EQ(dx[0], 0.5f * 1.f);
            continue;
        }
        expect_refusal([&] { sparse_linear_backward_data(bd).execute(s, only_weights); },
                       "argument workspace (the forward's quantized weights) is required");
        std::vector<float> x(12, 1.f), y(8);
        sparse_linear_forward(fwd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, fwd.src_desc(), x.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, fwd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DST, wrap(eng, fwd.dst_desc(), y.data())},
                    {DNNL_ARG_WORKSPACE, wrap(eng, fwd.workspace_desc(), ws.data())}});
        exec_args with_workspace = only_weights;
        with_workspace.erase(DNNL_ARG_WEIGHTS); // not read: the workspace has Wq
        with_workspace[DNNL_ARG_WORKSPACE] = wrap(eng, bd.workspace_desc(), ws.data());
        sparse_linear_backward_data(bd).execute(s, with_workspace);
        // dX = dY W, within the stochastic rounding of dY * sw (one step of
        // max |dY * sw| / 127, times |Wq| <= 127 steps of sw).
        EXPECT_NEAR(dx[0], 0.5f * 1.f, 0.5f * 3.f / 127 * 2);
        EXPECT_NEAR(dx[1], 0.5f * 3.f, 0.5f * 3.f / 127 * 2);
        EXPECT_NEAR(dx[2], 0.5f * -2.f, 0.5f * 3.f / 127 * 2);
        // A forward of the negated weights into the workspace: backward-data
        // follows it (same scales, Wq negated exactly, same rounding draws).
        const std::vector<float> first = dx;
        std::vector<float> negated = {-1.f, 2.f, -3.f};
        sparse_linear_forward(fwd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, fwd.src_desc(), x.data())},
                    {DNNL_ARG_WEIGHTS, wrap(eng, fwd.weights_desc(), negated.data())},
                    {DNNL_ARG_DST, wrap(eng, fwd.dst_desc(), y.data())},
                    {DNNL_ARG_WORKSPACE, wrap(eng, fwd.workspace_desc(), ws.data())}});
        sparse_linear_backward_data(bd).execute(s, with_workspace);
        for (size_t i = 0; i < dx.size(); ++i)
            EXPECT_EQ(dx[i], -first[i]) << i;
    }
}

TEST(PrimitiveApi, non_finite_inputs_propagate_like_dense) {
    // Row 0 of X holds an Inf at a column the weight of output 1 prunes:
    // dense torch gives 0 * Inf = NaN there; a naive sparse kernel would not.
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    auto w = csr_weights{csr_pattern::from_indices(2, 3, {0, 2, 3}, {0, 2, 1}), {1.f, 2.f, 3.f}};
    std::vector<float> x = {1.f, 1.f, INFINITY, 1.f, 2.f, 3.f}, y(4);
    sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_inference, f32_desc({2, 3}),
                                             w.pattern, f32_desc({2, 2}), quant_scheme::f32);
    sparse_linear_forward(pd).execute(
            s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), x.data())},
                {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())}});
    EXPECT_TRUE(std::isinf(y[0])); // 1*1 + 2*Inf
    EXPECT_TRUE(std::isnan(y[1])); // 3*1 + 0*Inf
    EXPECT_EQ(y[2], 1.f + 6.f);    // row 1 untouched
    EXPECT_EQ(y[3], 6.f);
}

TEST(Runtime, isa_cap_parsing) {
    EXPECT_EQ(cpu_isa_from_string("AVX2"), cpu_isa::avx2);
    EXPECT_EQ(cpu_isa_from_string("avx512_vnni"), cpu_isa::avx512_core_vnni);
    EXPECT_THROW(cpu_isa_from_string("sse9"), std::invalid_argument);
    set_max_cpu_isa(cpu_isa::ref);
    EXPECT_EQ(effective_cpu_isa(), cpu_isa::ref);
    set_max_cpu_isa(cpu_isa::avx512_core_vnni);
    EXPECT_EQ(effective_cpu_isa(), detected_cpu_isa());
}

// A cap of avx2 is oneDNN's AVX2: the AVX2 tier's int8 kernels leave AVX-VNNI
// alone (the three libraries capped stand for Zen 3 or Haswell); avx2_vnni
// and every cap above avx2 let them use it where the CPU has it.
TEST(Runtime, avx2_cap_leaves_avx_vnni_out_unless_named) {
    const bool has = cpu_has_avx_vnni();
    set_max_cpu_isa("avx2");
    EXPECT_FALSE(avx_vnni_usable());
    EXPECT_EQ(effective_cpu_isa(), std::min(detected_cpu_isa(), cpu_isa::avx2));
    set_max_cpu_isa("AVX2_VNNI");
    EXPECT_EQ(avx_vnni_usable(), has);
    EXPECT_EQ(effective_cpu_isa(), std::min(detected_cpu_isa(), cpu_isa::avx2));
    set_max_cpu_isa(cpu_isa::avx2);
    EXPECT_FALSE(avx_vnni_usable());
    set_max_cpu_isa(cpu_isa::avx2, true);
    EXPECT_EQ(avx_vnni_usable(), has);
    set_max_cpu_isa("all");
    EXPECT_EQ(avx_vnni_usable(), has);
    try {
        set_max_cpu_isa("avx3");
        ADD_FAILURE() << "an unknown cap was taken";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find("avx2_vnni"), std::string::npos) << e.what();
    }
    EXPECT_EQ(avx_vnni_usable(), has) << "a refused name left the cap as it was";
    set_max_cpu_isa(cpu_isa::avx512_core_vnni);
}

// The AVX2 tier's plans with and without AVX-VNNI are different plans (s8
// quads or pairs): switching the cap between them never runs one for the
// other, and both compute the same integers.
TEST(Runtime, avx2_plans_follow_the_avx_vnni_cap) {
    if (detected_cpu_isa() < cpu_isa::avx2) GTEST_SKIP() << "no AVX2 on this CPU";
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    std::mt19937 rng(3);
    const auto w = csr_weights::from_dense(random_sparse_dense(24, 40, 0.3, rng).data(), 24, 40);
    const std::vector<float> x = random_vector(8 * 40, rng);
    auto plans = [] {
        for (const cache_info &c : cache_infos())
            if (c.name == "jit_plan") return c.generations;
        return uint64_t(0);
    };
    std::vector<std::vector<float>> outputs;
    for (const char *cap : {"avx2_vnni", "avx2", "avx2_vnni"}) {
        SCOPED_TRACE(cap);
        set_max_cpu_isa(cap);
        const size_t before = plans();
        sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_inference,
                                                 f32_desc({8, 40}), w.pattern, f32_desc({8, 24}),
                                                 quant_scheme::s8);
        EXPECT_EQ(pd.impl_info_str().rfind("jit:avx2", 0), 0u) << pd.impl_info_str();
        std::vector<float> y(8 * 24);
        sparse_linear_forward(pd).execute(
                s, {{DNNL_ARG_SRC, wrap(eng, pd.src_desc(), const_cast<float *>(x.data()))},
                    {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                    {DNNL_ARG_DST, wrap(eng, pd.dst_desc(), y.data())}});
        outputs.push_back(y);
        // the second cap makes a plan of its own (where the CPU has AVX-VNNI
        // the two differ); the third finds the first's
        if (outputs.size() == 2 && cpu_has_avx_vnni()) EXPECT_GT(plans(), before);
        if (outputs.size() == 3) EXPECT_EQ(plans(), before);
    }
    set_max_cpu_isa(cpu_isa::avx512_core_vnni);
    EXPECT_EQ(outputs[1], outputs[0]);
    EXPECT_EQ(outputs[2], outputs[0]);
}

} // namespace qsp::test
