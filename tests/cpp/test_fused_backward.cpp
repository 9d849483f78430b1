// qsp::sparse_backward (backward-data + backward-weights in one execution,
// sharing the packed output gradient) against the two primitives run
// separately: the same bits, every tier, both schemes, Linear and Conv2d;
// and it refuses descriptors of different layers or shapes.
#include <cstring>

#include "training_step.hpp"

namespace qsp::test {

namespace {

// The fused backward and the two primitives on the same data: the same bits.
// `o` picks the implementations: in an s8 fused backward whose
// backward-weights reads G1 as plain int8 (the width family, dense:onednn_s8)
// backward-data makes G1 in its own pass over dY.
template <typename layer_t>
void expect_fused_equals_separate(const layer_t &layer, const csr_weights &w,
                                  const std::vector<float> &x, const std::vector<float> &dy,
                                  const std::vector<float> &bias, quant_scheme scheme,
                                  step_options o = {}) {
    o.scheme = scheme;
    const step_result a = training_step(layer, w, x, dy, bias, o);
    o.fused = true;
    const step_result b = training_step(layer, w, x, dy, bias, o);
    expect_same_bits(b.dx, a.dx, "diff_src");
    expect_same_bits(b.dw, a.dw, "diff_weights");
    expect_same_bits(b.db, a.db, "diff_bias");
}

} // namespace

TEST(FusedBackward, linear_equals_the_two_primitives_on_every_tier) {
    std::mt19937 rng(3);
    for (int64_t batch : {1, 17, 70}) {
        const int64_t K = 33, N = 65;
        auto w = csr_weights::from_dense(random_sparse_dense(N, K, 0.8, rng).data(), N, K);
        auto x = random_vector(static_cast<size_t>(batch * K), rng);
        auto dy = random_vector(static_cast<size_t>(batch * N), rng);
        const std::vector<float> bias(static_cast<size_t>(N), 0.5f);
        for (isa_level isa : isa_levels())
            for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(scheme) + " batch "
                             + std::to_string(batch));
                expect_fused_equals_separate(linear_layer{batch, K, N}, w, x, dy, bias, scheme);
            }
        // s8 with oneDNN's int8 matmul reading G1 (and making it, or the
        // JIT backward-data making it for it); oneDNN's int8 is exact only
        // with VNNI/AMX (the refusal elsewhere: S8Scheme's tests)
        if (!onednn_has_vnni()) continue;
        for (const char *data_impl : {"dense:onednn_s8", ""}) {
            SCOPED_TRACE(std::string("backward-data ") + data_impl + ", batch "
                         + std::to_string(batch));
            step_options o;
            o.implementation = data_impl;
            o.weights_implementation = "dense:onednn_s8";
            expect_fused_equals_separate(linear_layer{batch, K, N}, w, x, dy, bias,
                                         quant_scheme::s8, o);
        }
    }
}

TEST(FusedBackward, conv2d_equals_the_two_primitives_on_every_tier) {
    std::mt19937 rng(4);
    conv2d_geometry g = same_3x3();
    g.stride_w = 2;
    const conv2d_layer layer{3, 5, 6, 9, 8, g};
    const auto o = layer.out_hw();
    auto w = csr_weights::from_dense(random_sparse_dense(6, 5 * 9, 0.7, rng).data(), 6, 5 * 9);
    auto x = random_vector(static_cast<size_t>(3 * 5 * 9 * 8), rng);
    auto dy = random_vector(static_cast<size_t>(3 * 6 * o[0] * o[1]), rng);
    const std::vector<float> bias(6, 0.5f);
    for (isa_level isa : isa_levels())
        for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8})
            for (conv_vectorization v : {conv_vectorization::any, conv_vectorization::batch,
                                         conv_vectorization::output_width}) {
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(scheme) + " "
                             + to_string(v));
                step_options o;
                o.vectorization = v;
                expect_fused_equals_separate(layer, w, x, dy, bias, scheme, o);
            }
}

namespace {

// max |dy| per channel of a [batch, channels, inner] gradient, as its
// writer hands them over (QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX).
std::vector<float> channel_maxima(const std::vector<float> &dy, int64_t channels, int64_t inner) {
    std::vector<float> m(static_cast<size_t>(channels), 0.f);
    for (size_t i = 0; i < dy.size(); ++i) {
        float &c = m[(i / static_cast<size_t>(inner)) % static_cast<size_t>(channels)];
        c = std::max(c, std::fabs(dy[i]));
    }
    return m;
}

std::vector<float> times(std::vector<float> v, float f) {
    for (float &x : v)
        x *= f;
    return v;
}

} // namespace

// Given max |dY| per output channel (as a BatchNorm's backward finds them
// while writing dY), the s8 fused backward skips its own pass for them: the
// same bits as without; maxima twice the true ones change the integers
// wherever they are read (the pair's pass: the JIT families on AVX2 and up).
TEST(FusedBackward, s8_takes_the_channel_maxima_of_its_output_gradient) {
    std::mt19937 rng(6);
    conv2d_geometry g = same_3x3();
    const conv2d_layer layer{3, 5, 7, 9, 8, g};
    const auto hw = layer.out_hw();
    const int64_t plane = hw[0] * hw[1];
    auto w = csr_weights::from_dense(random_sparse_dense(7, 5 * 9, 0.7, rng).data(), 7, 5 * 9);
    auto x = random_vector(static_cast<size_t>(3 * 5 * 9 * 8), rng);
    auto dy = random_vector(static_cast<size_t>(3 * 7 * plane), rng);
    dy[5] = -9.f; // a channel whose maximum is a negative value
    const std::vector<float> bias(7, 0.5f);
    const std::vector<float> maxima = channel_maxima(dy, 7, plane), doubled = times(maxima, 2.f);
    int read = 0;
    for_each_s8_conv_case([&](step_options o) {
        o.fused = true;
        const step_result found = training_step(layer, w, x, dy, bias, o);
        o.dy_channel_abs_max = &maxima;
        const step_result given = training_step(layer, w, x, dy, bias, o);
        expect_same_bits(given.dx, found.dx, "diff_src");
        expect_same_bits(given.dw, found.dw, "diff_weights");
        o.dy_channel_abs_max = &doubled;
        const step_result wrong = training_step(layer, w, x, dy, bias, o);
        read += std::memcmp(wrong.dx.data(), found.dx.data(), found.dx.size() * 4) != 0;
    });
    if (detected_cpu_isa() >= cpu_isa::avx2) EXPECT_GT(read, 0) << "the maxima were never read";
}

// Backward-weights alone (a network's first layer) takes the channel maxima
// too: G1's scale from them, dY read once; the same bits as finding them,
// and doubled maxima change the result where they are read (both JIT
// Conv2d families on every tier, the s8 Linear's JIT and oneDNN's int8).
TEST(FusedBackward, s8_backward_weights_alone_takes_the_channel_maxima) {
    std::mt19937 rng(16);
    const conv2d_layer layer{3, 5, 7, 9, 8, same_3x3()};
    const auto hw = layer.out_hw();
    const int64_t plane = hw[0] * hw[1];
    auto w = csr_weights::from_dense(random_sparse_dense(7, 5 * 9, 0.7, rng).data(), 7, 5 * 9);
    auto x = random_vector(static_cast<size_t>(3 * 5 * 9 * 8), rng);
    auto dy = random_vector(static_cast<size_t>(3 * 7 * plane), rng);
    const std::vector<float> bias(7, 0.5f);
    const std::vector<float> maxima = channel_maxima(dy, 7, plane), doubled = times(maxima, 2.f);
    int read = 0, width_read = 0;
    for_each_s8_conv_case([&](step_options o) {
        o.weights_only = true;
        const step_result found = training_step(layer, w, x, dy, bias, o);
        ASSERT_TRUE(found.dx.empty());
        o.dy_channel_abs_max = &maxima;
        const step_result given = training_step(layer, w, x, dy, bias, o);
        expect_same_bits(given.dw, found.dw, "diff_weights");
        expect_same_bits(given.db, found.db, "diff_bias");
        o.dy_channel_abs_max = &doubled;
        const step_result wrong = training_step(layer, w, x, dy, bias, o);
        const bool changed =
                std::memcmp(wrong.dw.data(), found.dw.data(), found.dw.size() * 4) != 0;
        read += changed;
        width_read += changed && found.impl.find(":width") != std::string::npos;
    });
    if (detected_cpu_isa() >= cpu_isa::avx2) {
        EXPECT_GT(read, 0) << "the maxima were never read";
        EXPECT_GT(width_read, 0) << "the output-width family never read them";
    }
    // the s8 Linear's backward-weights (its JIT tiles, oneDNN's int8 matmul) the same way
    const linear_layer lin{16, 24, 10};
    auto lw = csr_weights::from_dense(random_sparse_dense(10, 24, 0.7, rng).data(), 10, 24);
    auto lx = random_vector(16 * 24, rng), ldy = random_vector(16 * 10, rng);
    const std::vector<float> lmax = channel_maxima(ldy, 10, 1), ldoubled = times(lmax, 2.f);
    for (isa_level isa : isa_levels()) {
        isa_cap_guard cap(isa);
        SCOPED_TRACE(to_string(isa));
        step_options o;
        o.scheme = quant_scheme::s8;
        o.weights_only = true;
        const std::vector<float> lbias(10, 0.25f);
        const step_result found = training_step(lin, lw, lx, ldy, lbias, o);
        o.dy_channel_abs_max = &lmax;
        const step_result given = training_step(lin, lw, lx, ldy, lbias, o);
        expect_same_bits(given.dw, found.dw, "linear diff_weights");
        o.dy_channel_abs_max = &ldoubled;
        const step_result wrong = training_step(lin, lw, lx, ldy, lbias, o);
        if (isa >= cpu_isa::avx2 && found.impl.find("jit") != std::string::npos)
            EXPECT_NE(std::memcmp(wrong.dw.data(), found.dw.data(), found.dw.size() * 4), 0)
                    << found.impl;
    }
    if (onednn_has_vnni()) { // oneDNN's int8 is exact only with VNNI/AMX
        step_options o;
        o.scheme = quant_scheme::s8;
        o.weights_only = true;
        o.weights_implementation = "dense:onednn_s8";
        const std::vector<float> lbias(10, 0.25f);
        const step_result found = training_step(lin, lw, lx, ldy, lbias, o);
        ASSERT_NE(found.impl.find("onednn"), std::string::npos) << found.impl;
        o.dy_channel_abs_max = &lmax;
        expect_same_bits(training_step(lin, lw, lx, ldy, lbias, o).dw, found.dw,
                         "oneDNN diff_weights");
        o.dy_channel_abs_max = &ldoubled;
        EXPECT_NE(std::memcmp(training_step(lin, lw, lx, ldy, lbias, o).dw.data(), found.dw.data(),
                              found.dw.size() * 4),
                  0);
    }
}

// dY given as the int8 BatchNorm's backward after the convolution
// (QSP_ARG_BN_*): the fused backward rounds it as it computes it, and the
// result is the bits of the same step given the dY that BatchNorm backward
// writes — with and without a ReLU mask, with and without the channel
// maxima, strided (the width family's phases), every tier and
// vectorization, oneDNN's int8 backward-data where it is exact; separate
// primitives and a bias gradient (dY then written into DIFF_DST) too.
TEST(FusedBackward, s8_conv2d_takes_dy_as_its_batch_norms_backward) {
    std::mt19937 rng(9);
    for (int64_t stride : {1, 2}) {
        conv2d_geometry g = same_3x3();
        g.stride_h = g.stride_w = stride;
        const conv2d_layer layer{3, 5, 7, 9, 8, g};
        const auto hw = layer.out_hw();
        const int64_t C = 7, n = 3 * C * hw[0] * hw[1];
        auto w = csr_weights::from_dense(random_sparse_dense(C, 5 * 9, 0.7, rng).data(), C, 5 * 9);
        auto x = random_vector(static_cast<size_t>(3 * 5 * 9 * 8), rng);
        const std::vector<float> bias(static_cast<size_t>(C), 0.5f);
        for (bool relu : {true, false}) {
            SCOPED_TRACE(std::string("stride ") + std::to_string(stride) + (relu ? " relu" : ""));
            batch_norm_dy bn;
            bn.diff_dst = random_vector(static_cast<size_t>(n), rng);
            bn.centered.resize(static_cast<size_t>(n));
            for (auto &v : bn.centered)
                v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
            if (relu) {
                bn.mask.resize(static_cast<size_t>((n + 7) / 8));
                for (auto &v : bn.mask)
                    v = static_cast<uint8_t>(rng());
            }
            bn.step = random_vector(static_cast<size_t>(C), rng, 0.01f, 0.05f);
            const auto gamma = random_vector(static_cast<size_t>(C), rng, 0.5f, 2.f);
            const auto invstd = random_vector(static_cast<size_t>(C), rng, 0.5f, 3.f);
            batch_norm_relu_desc d;
            d.batch = 3, d.channels = C, d.spatial = hw[0] * hw[1], d.relu = relu;
            // the dY BatchNorm backward writes, its maxima, and its coefficients
            std::vector<float> dy(static_cast<size_t>(n)), maxima(C), computed(C, -1.f);
            batch_norm_relu_backward(d, bn.diff_dst.data(), relu ? bn.mask.data() : nullptr,
                                     bn.centered.data(), bn.step.data(), gamma.data(),
                                     invstd.data(), dy.data(), nullptr, nullptr, maxima.data(), 2);
            bn.coefficients.resize(static_cast<size_t>(3 * C));
            batch_norm_relu_backward_coefficients(
                    d, bn.diff_dst.data(), relu ? bn.mask.data() : nullptr, bn.centered.data(),
                    bn.step.data(), gamma.data(), invstd.data(), bn.coefficients.data(), nullptr,
                    nullptr, nullptr, computed.data(), 3);
            expect_same_bits(computed, maxima, "maxima found without writing dY");
            // `in_memory`: whether dY must have been written into DIFF_DST
            const auto check = [&](step_options o, const char *what, bool in_memory) {
                SCOPED_TRACE(what);
                const step_result want = training_step(layer, w, x, dy, bias, o);
                o.bn_dy = &bn;
                const step_result got = training_step(layer, w, x, dy, bias, o);
                expect_same_bits(got.dx, want.dx, "diff_src");
                expect_same_bits(got.dw, want.dw, "diff_weights");
                expect_same_bits(got.db, want.db, "diff_bias");
                EXPECT_EQ(got.dy_written, in_memory) << got.impl;
            };
            for_each_s8_conv_case([&](step_options o) {
                o.bias = false;
                o.fused = true;
                // the reference reads dY itself; the JIT families round it as computed
                const bool ref = effective_cpu_isa() == cpu_isa::ref;
                check(o, "fused, maxima found", ref);
                o.dy_channel_abs_max = &maxima;
                check(o, "fused, maxima given", ref);
                o.bias = true;
                check(o, "fused with a bias gradient", true);
                o.bias = false;
                o.fused = false;
                check(o, "separate primitives", true);
            });
            if (onednn_has_vnni()) // backward-weights by the JIT (reading the shared
                                   // rounding) or by the reference (reading dY itself)
                for (const std::string weights :
                     {std::string("jit:") + to_string(detected_cpu_isa()) + ":batch",
                      std::string("ref:any")}) {
                    step_options o;
                    o.scheme = quant_scheme::s8;
                    o.bias = false;
                    o.fused = true;
                    o.implementation = "dense:onednn_s8";
                    o.weights_implementation = weights;
                    check(o, ("oneDNN's int8 backward-data, backward-weights " + weights).c_str(),
                          weights == "ref:any");
                }
        }
    }
}

// Part of the BatchNorm source of dY missing: a named refusal.
TEST(FusedBackward, refuses_an_incomplete_batch_norm_source) {
    std::mt19937 rng(10);
    const conv2d_layer layer{2, 3, 4, 5, 5, same_3x3()};
    const int64_t n = 2 * 4 * 5 * 5;
    auto w = csr_weights::from_dense(random_sparse_dense(4, 3 * 9, 0.5, rng).data(), 4, 3 * 9);
    auto x = random_vector(static_cast<size_t>(2 * 3 * 5 * 5), rng);
    const auto dy = random_vector(static_cast<size_t>(n), rng);
    batch_norm_dy bn;
    bn.diff_dst = dy;
    bn.centered.assign(static_cast<size_t>(n), 1);
    bn.step.assign(4, 0.1f);
    bn.coefficients.assign(12, 1.f);
    step_options o;
    o.scheme = quant_scheme::s8;
    o.fused = true;
    o.bias = false;
    o.bn_dy = &bn;
    EXPECT_NO_THROW(training_step(layer, w, x, dy, {}, o));
    bn.centered.clear(); // the argument left out
    const auto refused = [&] { training_step(layer, w, x, dy, {}, o); };
    expect_refusal(refused, "bn_centered");
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
