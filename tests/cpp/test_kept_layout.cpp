// The kept layout (kept_layout_desc): it is oneDNN's Acb64a (a reorder of a
// plain tensor gives the tiles the packing pass gives, padding zero); a
// Linear training step with its activation and / or gradient in it gives
// the plain step's results bit for bit on every tier, both schemes, 1 and 3
// threads, odd batches, fused or not, native (JIT f32) or converted (the
// reference, oneDNN's int8); post-ops run over the tiles; a non-finite input
// still gets dense semantics; and the refusals name the rule.
#include <cmath>
#include <cstring>

#include "primitives/core/s8_protocol.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "qsparseprop/runtime.hpp"
#include "training_step.hpp"

namespace qsp::test {

namespace {

constexpr int64_t lanes = 64; // a tile's examples

const std::vector<int64_t> batches = {1, 3, 17, 63, 64, 65, 130};

} // namespace

TEST(KeptLayout, is_onednns_Acb64a_and_the_packing_pass_writes_it) {
    std::mt19937 rng(1);
    for (int64_t batch : batches)
        for (int64_t features : {1, 17, 33}) {
            SCOPED_TRACE("batch " + std::to_string(batch) + " features "
                         + std::to_string(features));
            const auto md = kept_layout_desc(batch, features);
            EXPECT_EQ(md.get_size(), sizeof(float)
                                             * static_cast<size_t>((batch + lanes - 1) / lanes
                                                                   * lanes * features));
            const auto plain = random_vector(static_cast<size_t>(batch * features), rng);
            const auto by_onednn = reordered_into(plain, md);
            expect_zero_padding(by_onednn, batch, features, "oneDNN's reorder");
            for (isa_level isa : isa_levels()) {
                isa_cap_guard cap(isa);
                SCOPED_TRACE(to_string(isa));
                std::vector<float> ours(by_onednn.size(), NAN);
                for (int threads : {1, 3}) {
                    detail::pack_kept(plain.data(), batch, features, ours.data(), threads);
                    expect_same_bits(ours, by_onednn, "pack_kept");
                }
                std::vector<float> back(plain.size(), NAN);
                detail::unpack_tiles(ours.data(), batch, features, nullptr, back.data(), 2, 1);
                expect_same_bits(back, plain, "unpack_tiles");
            }
        }
}

TEST(KeptLayout, a_linear_step_in_it_equals_the_plain_step_on_every_tier) {
    std::mt19937 rng(2);
    const int64_t K = 33, N = 65;
    for (int64_t batch : {1, 17, 64, 65, 130}) {
        auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.8, rng).data(), N, K);
        // an empty and a full row
        const auto dense = random_sparse_dense(N, K, 0.8, rng);
        std::vector<float> edited = dense;
        std::fill(edited.begin(), edited.begin() + K, 0.f);
        std::fill(edited.begin() + K, edited.begin() + 2 * K, 0.5f);
        w = csr_weights::from_dense(edited.data(), N, K);
        const auto x = random_vector(static_cast<size_t>(batch * K), rng);
        const auto dy = random_vector(static_cast<size_t>(batch * N), rng);
        const std::vector<float> bias = random_vector(static_cast<size_t>(N), rng);
        for (isa_level isa : isa_levels())
            for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8})
                for (int threads : {1, 3}) {
                    isa_cap_guard cap(isa);
                    step_options o;
                    o.scheme = scheme;
                    o.threads = threads;
                    const step_result plain =
                            training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
                    for (bool fused : {false, true})
                        for (auto [src_kept, dst_kept] :
                             {std::pair{true, false}, std::pair{false, true},
                              std::pair{true, true}}) {
                            SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(scheme)
                                         + " batch " + std::to_string(batch) + " threads "
                                         + std::to_string(threads) + (fused ? " fused" : "")
                                         + " src " + (src_kept ? "kept" : "plain") + " dst "
                                         + (dst_kept ? "kept" : "plain"));
                            step_options k = o;
                            k.fused = fused;
                            k.src_kept = src_kept;
                            k.dst_kept = dst_kept;
                            const step_result got =
                                    training_step(linear_layer{batch, K, N}, w, x, dy, bias, k);
                            EXPECT_EQ(got.impl, plain.impl);
                            expect_same_bits(got.y, plain.y, "forward dst");
                            expect_same_bits(got.dx, plain.dx, "backward_data diff_src");
                            expect_same_bits(got.dw, plain.dw, "diff_weights");
                            expect_same_bits(got.db, plain.db, "diff_bias");
                        }
                }
    }
}

// An s8 forward that reads a kept src natively (the JIT's entry pairs)
// leaves Xq in the workspace as the kept layout's tiles; a backward-weights
// implementation that reads only the plain form refuses that workspace by
// name instead of reading it as plain (the same JIT's reads both).
TEST(KeptLayout, an_s8_workspace_in_tiles_is_refused_by_a_plain_reader) {
    std::mt19937 rng(9);
    const int64_t batch = 65, K = 33, N = 40;
    const auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.7, rng).data(), N, K);
    const auto x = random_vector(static_cast<size_t>(batch * K), rng);
    const auto dy = random_vector(static_cast<size_t>(batch * N), rng);
    const std::vector<float> bias(static_cast<size_t>(N), 0.5f);
    int native_levels = 0;
    for (isa_level isa : isa_levels()) {
        isa_cap_guard cap(isa);
        SCOPED_TRACE(to_string(isa));
        step_options o;
        o.scheme = quant_scheme::s8;
        o.src_kept = true;
        const step_result jit = training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
        // the header's form byte, after the scale (s8_protocol.hpp)
        const bool tiles = jit.workspace.size() > sizeof(float)
                           && jit.workspace[sizeof(float)]
                                      == static_cast<uint8_t>(detail::s8::src_q_form::tiles);
        o.weights_implementation = "ref:any";
        if (!tiles) { // a forward that wrote Xq plain: the reference reads it
            const step_result ref = training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
            expect_same_bits(ref.dw, jit.dw, "diff_weights");
            continue;
        }
        ++native_levels;
        EXPECT_TRUE(jit.impl.rfind("jit:avx2", 0) == 0
                    || (jit.impl.rfind("jit:avx512_core", 0) == 0
                        && jit.impl.rfind("jit:avx512_core_vnni", 0) != 0))
                << jit.impl;
        try {
            training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
            ADD_FAILURE() << "a plain reader read a workspace in tiles";
        } catch (const std::invalid_argument &e) {
            EXPECT_NE(std::string(e.what()).find("kept layout's tiles"), std::string::npos)
                    << e.what();
        }
    }
    // entry pairs run on AVX2 without AVX-VNNI and on AVX-512 without VNNI
    // (every AVX2-or-better CPU has the first among its levels)
    if (detected_cpu_isa() >= cpu_isa::avx2) EXPECT_GT(native_levels, 0);
}

// The implementations that convert (their kernels read plain tensors).
TEST(KeptLayout, implementations_that_convert_give_the_same_bits) {
    std::mt19937 rng(3);
    const int64_t batch = 65, K = 40, N = 24;
    const auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.7, rng).data(), N, K);
    const auto x = random_vector(static_cast<size_t>(batch * K), rng);
    const auto dy = random_vector(static_cast<size_t>(batch * N), rng);
    const std::vector<float> bias(static_cast<size_t>(N), 0.25f);
    std::vector<std::pair<quant_scheme, std::string>> cases = {{quant_scheme::f32, "ref:any"},
                                                               {quant_scheme::s8, "ref:any"}};
    if (onednn_has_vnni()) cases.emplace_back(quant_scheme::s8, "dense:onednn_s8");
    for (const auto &[scheme, impl] : cases) {
        SCOPED_TRACE(impl + " " + to_string(scheme));
        step_options o;
        o.scheme = scheme;
        o.implementation = impl;
        const step_result plain = training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
        o.src_kept = o.dst_kept = true;
        const step_result got = training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
        EXPECT_EQ(got.impl, plain.impl);
        expect_same_bits(got.y, plain.y, "forward dst");
        expect_same_bits(got.dx, plain.dx, "backward_data diff_src");
        expect_same_bits(got.dw, plain.dw, "diff_weights");
        expect_same_bits(got.db, plain.db, "diff_bias");
    }
}

// ReLU with its mask over a kept dst: the tiles of the plain result, the
// mask one bit per kept element (padding bits zero), as
// relu_with_mask_forward gives them over the kept tensor.
TEST(KeptLayout, post_ops_run_over_the_tiles) {
    std::mt19937 rng(4);
    const int64_t K = 31, N = 19;
    const auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.6, rng).data(), N, K);
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    for (int64_t batch : {1, 65})
        for (isa_level isa : isa_levels())
            for (const char *impl : {"", "ref:any"}) {
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + impl + " batch "
                             + std::to_string(batch));
                const auto x = random_vector(static_cast<size_t>(batch * K), rng);
                const auto residual = random_vector(static_cast<size_t>(batch * N), rng);
                const auto src_md = kept_layout_desc(batch, K), dst_md = kept_layout_desc(batch, N);
                const auto x_kept = reordered_into(x, src_md);
                const auto residual_kept = reordered_into(residual, dst_md);
                primitive_attr attr;
                attr.implementation = impl;
                attr.ops.append_add().append_relu();
                const sparse_linear_forward::primitive_desc pd(eng, prop_kind::forward_inference,
                                                               src_md, w.pattern, dst_md,
                                                               quant_scheme::f32, attr);
                const int64_t kept_n = static_cast<int64_t>(dst_md.get_size() / sizeof(float));
                std::vector<float> y(static_cast<size_t>(kept_n), NAN);
                std::vector<uint8_t> mask(static_cast<size_t>((kept_n + 7) / 8), 0xAB);
                const dnnl::memory::desc mask_md({(kept_n + 7) / 8}, dnnl::memory::data_type::u8,
                                                 dnnl::memory::dims{1});
                sparse_linear_forward(pd).execute(
                        s,
                        {{DNNL_ARG_SRC, wrap(eng, src_md, x_kept.data())},
                         {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                         {DNNL_ARG_DST, wrap(eng, dst_md, y.data())},
                         {QSP_ARG_POST_OP(0, QSP_POST_OP_SRC),
                          wrap(eng, dst_md, residual_kept.data())},
                         {QSP_ARG_POST_OP(1, QSP_POST_OP_MASK), wrap(eng, mask_md, mask.data())}});
                // the plain forward with the same chain, its output reordered
                const sparse_linear_forward::primitive_desc plain_pd(
                        eng, prop_kind::forward_inference, f32_desc({batch, K}), w.pattern,
                        f32_desc({batch, N}), quant_scheme::f32, attr);
                std::vector<float> plain_y(static_cast<size_t>(batch * N), NAN);
                std::vector<uint8_t> plain_mask(static_cast<size_t>((batch * N + 7) / 8));
                sparse_linear_forward(plain_pd).execute(
                        s, {{DNNL_ARG_SRC, wrap(eng, plain_pd.src_desc(), x.data())},
                            {DNNL_ARG_WEIGHTS, wrap(eng, pd.weights_desc(), w.values.data())},
                            {DNNL_ARG_DST, wrap(eng, plain_pd.dst_desc(), plain_y.data())},
                            {QSP_ARG_POST_OP(0, QSP_POST_OP_SRC),
                             wrap(eng, plain_pd.dst_desc(), residual.data())},
                            {QSP_ARG_POST_OP(1, QSP_POST_OP_MASK),
                             wrap(eng,
                                  dnnl::memory::desc({(batch * N + 7) / 8},
                                                     dnnl::memory::data_type::u8,
                                                     dnnl::memory::dims{1}),
                                  plain_mask.data())}});
                expect_same_bits(y, reordered_into(plain_y, dst_md), "dst");
                std::vector<float> relu(y.size());
                std::vector<uint8_t> want_mask(mask.size(), 0xCD);
                relu_with_mask_forward(y.data(), relu.data(), want_mask.data(), kept_n, 1);
                EXPECT_EQ(mask, want_mask);
                expect_zero_padding(y, batch, N, "dst");
            }
}

// A NaN in a kept input: dense torch's semantics (the guard's reference
// run on plain copies), as for a plain input.
TEST(KeptLayout, a_non_finite_input_still_gets_dense_semantics) {
    std::mt19937 rng(5);
    const int64_t batch = 70, K = 20, N = 12;
    const auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.9, rng).data(), N, K);
    auto x = random_vector(static_cast<size_t>(batch * K), rng);
    auto dy = random_vector(static_cast<size_t>(batch * N), rng);
    x[static_cast<size_t>(66 * K + 3)] = NAN;
    dy[static_cast<size_t>(5 * N + 1)] = INFINITY;
    const std::vector<float> bias(static_cast<size_t>(N), 0.f);
    for (isa_level isa : isa_levels()) {
        isa_cap_guard cap(isa);
        SCOPED_TRACE(to_string(isa));
        step_options o;
        const step_result plain = training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
        // dense semantics: the NaN input's row is NaN in every output
        for (int64_t n = 0; n < N; ++n)
            EXPECT_TRUE(std::isnan(plain.y[static_cast<size_t>(66 * N + n)]));
        o.src_kept = o.dst_kept = true;
        const step_result got = training_step(linear_layer{batch, K, N}, w, x, dy, bias, o);
        expect_same_bits(got.y, plain.y, "forward dst");
        expect_same_bits(got.dx, plain.dx, "backward_data diff_src");
    }
}

// What a caller choosing layouts asks (python's fused MLP keeps the hidden
// activation plain unless every direction reads tiles natively).
TEST(KeptLayout, a_descriptor_says_whether_its_implementation_reads_it_natively) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    std::mt19937 rng(7);
    const auto w = csr_weights::from_dense(random_sparse_dense(8, 5, 0.5, rng).data(), 8, 5);
    auto pd = [&](const char *impl, quant_scheme scheme) {
        primitive_attr attr;
        attr.implementation = impl;
        return sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                     f32_desc({4, 5}), w.pattern,
                                                     kept_layout_desc(4, 8), scheme, attr);
    };
    auto takes = [&](const char *impl, quant_scheme scheme) {
        return pd(impl, scheme).takes_kept_layout();
    };
    EXPECT_FALSE(takes("ref:any", quant_scheme::f32));
    EXPECT_FALSE(takes("ref:any", quant_scheme::s8));
    // the JIT tiers' picks: f32 reads tiles; s8 where its kernels read s8
    // tiles (entry pairs: AVX2 without AVX-VNNI, AVX-512 without VNNI), the
    // quads' tiers convert
    for (isa_level isa : isa_levels()) {
        if (isa < cpu_isa::avx2) continue;
        isa_cap_guard cap(isa);
        SCOPED_TRACE(to_string(isa));
        EXPECT_TRUE(takes("", quant_scheme::f32));
        const std::string picked = pd("", quant_scheme::s8).impl_info_str();
        const bool entry_pairs = (picked.rfind("jit:avx2", 0) == 0 && !avx_vnni_usable())
                                 || (picked.rfind("jit:avx512_core", 0) == 0
                                     && picked.rfind("jit:avx512_core_vnni", 0) != 0);
        EXPECT_EQ(takes("", quant_scheme::s8), entry_pairs) << picked;
    }
}

TEST(KeptLayout, refusals_name_the_rule) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    std::mt19937 rng(6);
    const auto w = csr_weights::from_dense(random_sparse_dense(8, 5, 0.5, rng).data(), 8, 5);
    primitive_attr stats;
    stats.ops.append_batch_statistics();
    expect_refusal(
            [&] {
                sparse_linear_forward::primitive_desc(
                        eng, prop_kind::forward_training, f32_desc({4, 5}), w.pattern,
                        kept_layout_desc(4, 8), quant_scheme::f32, stats);
            },
            "batch_statistics needs a plain dst");
    expect_refusal(
            [&] {
                sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                      f32_desc({4, 5, 1}), w.pattern,
                                                      f32_desc({4, 8}), quant_scheme::f32);
            },
            "not the kept layout");
    expect_refusal(
            [&] {
                sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                      kept_layout_desc(4, 5), w.pattern,
                                                      kept_layout_desc(3, 8), quant_scheme::f32);
            },
            "has batch 3");
    expect_refusal(
            [&] {
                sparse_linear_forward::primitive_desc(eng, prop_kind::forward_training,
                                                      kept_layout_desc(4, 6), w.pattern,
                                                      f32_desc({4, 8}), quant_scheme::f32);
            },
            "in_features");
    // Conv2d has no kept layout
    const auto cw = csr_weights::from_dense(random_sparse_dense(4, 9, 0.5, rng).data(), 4, 9);
    conv2d_geometry g = same_3x3();
    expect_refusal(
            [&] {
                sparse_conv2d_forward::primitive_desc(
                        eng, prop_kind::forward_training, kept_layout_desc(2, 1), cw.pattern,
                        dnnl::memory::desc(), f32_desc({2, 4, 5, 5}), g, quant_scheme::f32);
            },
            "src_desc");
}

} // namespace qsp::test
