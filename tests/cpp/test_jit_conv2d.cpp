// The JIT Conv2d implementations against the reference: both vectorizations
// (batch-innermost, output-width-innermost) at every ISA tier the CPU has, f32 (1e-5 relative, the
// sums' order differs) and s8 (bit for bit: both compute the scheme's exact integers), over kernel
// sizes 1 to 7 and non-square, strides, asymmetric padding, dilation, groups (depthwise too), odd
// channel counts and image sizes, thread counts 1-3, and batch sizes that change while one plan
// serves them.
#include <cstring>

#include "primitives/sparse_jit/jit_conv2d.hpp"
#include "training_step.hpp"

namespace qsp::test {

namespace {

struct conv_case {
    int64_t batch, in_c, out_c, h, w;
    conv2d_geometry g;
    double sparsity;
    std::string str() const {
        return "N" + std::to_string(batch) + " C" + std::to_string(in_c) + " OC"
               + std::to_string(out_c) + " " + std::to_string(h) + "x" + std::to_string(w) + " k"
               + std::to_string(g.kernel_h) + "x" + std::to_string(g.kernel_w) + " s"
               + std::to_string(g.stride_h) + "," + std::to_string(g.stride_w) + " p"
               + std::to_string(g.pad_top) + std::to_string(g.pad_bottom)
               + std::to_string(g.pad_left) + std::to_string(g.pad_right) + " d"
               + std::to_string(g.dilation_h) + "," + std::to_string(g.dilation_w) + " g"
               + std::to_string(g.groups) + " sparsity " + std::to_string(sparsity);
    }
};

using outputs = step_result;

outputs run(const conv_case &c, const csr_weights &w, const std::vector<float> &x,
            const std::vector<float> &dy, const std::vector<float> &bias, quant_scheme scheme,
            int threads, const std::string &impl,
            conv_vectorization vectorization = conv_vectorization::any) {
    step_options o;
    o.scheme = scheme;
    o.threads = threads;
    o.implementation = impl;
    o.vectorization = vectorization;
    o.seed = 9;
    return training_step(conv2d_layer{c.batch, c.in_c, c.out_c, c.h, c.w, c.g}, w, x, dy, bias, o);
}

// Forward and backward-data of the s8 scheme on dense:onednn_s8 (which has
// no backward-weights: the reference runs it).
outputs run_dense_fwd_bwd_data(const conv_case &c, const csr_weights &w,
                               const std::vector<float> &x, const std::vector<float> &dy,
                               const std::vector<float> &bias, int threads) {
    step_options o;
    o.scheme = quant_scheme::s8;
    o.threads = threads;
    o.implementation = "dense:onednn_s8";
    o.weights_implementation = "ref:any";
    o.seed = 9;
    outputs r =
            training_step(conv2d_layer{c.batch, c.in_c, c.out_c, c.h, c.w, c.g}, w, x, dy, bias, o);
    r.impl = r.impl.substr(0, r.impl.rfind('/')); // forward/backward-data
    return r;
}

// |a - b| <= 1e-5 * scale + tiny: both are f32 sums of the same terms.
void expect_close(const std::vector<float> &a, const std::vector<float> &b, double scale,
                  const char *what) {
    ASSERT_EQ(a.size(), b.size());
    int bad = 0;
    for (size_t i = 0; i < a.size(); ++i)
        if (!(std::fabs(a[i] - b[i]) <= 1e-5 * scale + 1e-6) && bad++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

void expect_bitwise(const std::vector<float> &a, const std::vector<float> &b, const char *what) {
    ASSERT_EQ(a.size(), b.size());
    int bad = 0;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0 && bad++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs reference " << b[i];
}

std::string jit_name(cpu_isa isa, quant_scheme scheme, conv_vectorization v) {
    const char *strategy = v == conv_vectorization::batch ? ":batch" : ":width";
    if (isa == cpu_isa::avx2) return std::string("jit:avx2") + strategy;
    if (scheme == quant_scheme::s8 && isa == cpu_isa::avx512_core_vnni)
        return std::string("jit:avx512_core_vnni") + strategy;
    return std::string("jit:avx512_core") + strategy;
}

const conv_vectorization strategies[] = {conv_vectorization::batch,
                                         conv_vectorization::output_width};

// A case's random weights (at its sparsity), input, output gradient and
// bias, drawn from rng in that order.
struct case_data {
    int64_t cols;
    csr_weights w;
    std::array<int64_t, 2> o; // the output's height and width
    std::vector<float> x, dy, bias;
};

case_data draw_case(const conv_case &c, std::mt19937 &rng) {
    const int64_t cols = c.in_c / c.g.groups * c.g.kernel_h * c.g.kernel_w;
    auto w = csr_weights::from_dense(random_sparse_dense(c.out_c, cols, c.sparsity, rng).data(),
                                     c.out_c, cols);
    const auto o = conv2d_output_hw(c.g, c.h, c.w);
    auto x = random_vector(static_cast<size_t>(c.batch * c.in_c * c.h * c.w), rng);
    auto dy = random_vector(static_cast<size_t>(c.batch * c.out_c * o[0] * o[1]), rng);
    auto bias = random_vector(static_cast<size_t>(c.out_c), rng);
    return {cols, std::move(w), o, std::move(x), std::move(dy), std::move(bias)};
}

// Every tier and both schemes against the reference, for one case.
void compare_with_reference(const conv_case &c, int threads, unsigned seed) {
    SCOPED_TRACE(c.str() + " threads " + std::to_string(threads));
    std::mt19937 rng(seed);
    const auto [cols, w, o, x, dy, bias] = draw_case(c, rng);
    // magnitude bounds of the f32 sums (values in [-1, 1])
    const double fwd_scale = double(cols) + 1,
                 bd_scale = double(c.out_c * c.g.kernel_h * c.g.kernel_w),
                 bw_scale = double(c.batch * o[0] * o[1]) + 1;
    for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
        SCOPED_TRACE(to_string(scheme));
        const outputs want = run(c, w, x, dy, bias, scheme, threads, "ref:any");
        for (isa_level isa : isa_levels())
            for (conv_vectorization v : strategies) {
                if (isa == cpu_isa::ref) continue;
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(v));
                const std::string name = jit_name(isa, scheme, v);
                const outputs got = run(c, w, x, dy, bias, scheme, threads, "", v);
                EXPECT_EQ(got.impl, name + "/" + name + "/" + name);
                if (scheme == quant_scheme::s8) {
                    expect_bitwise(got.y, want.y, "forward");
                    expect_bitwise(got.dx, want.dx, "backward_data");
                    expect_bitwise(got.dw, want.dw, "backward_weights");
                } else {
                    expect_close(got.y, want.y, fwd_scale, "forward");
                    expect_close(got.dx, want.dx, bd_scale, "backward_data");
                    expect_close(got.dw, want.dw, bw_scale, "backward_weights");
                }
                expect_close(got.db, want.db, bw_scale, "diff_bias");
            }
    }
}

// Each case against the reference, seeds from `seed` on, 1-3 threads in turn.
void compare_cases(const std::vector<conv_case> &cases, unsigned seed) {
    int threads = 1;
    for (const conv_case &c : cases) {
        compare_with_reference(c, threads, seed++);
        threads = threads % 3 + 1;
    }
}

conv2d_geometry geometry(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                         int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t groups) {
    conv2d_geometry g;
    g.kernel_h = kh;
    g.kernel_w = kw;
    g.stride_h = sh;
    g.stride_w = sw;
    g.pad_top = pt;
    g.pad_bottom = pb;
    g.pad_left = pl;
    g.pad_right = pr;
    g.dilation_h = dh;
    g.dilation_w = dw;
    g.groups = groups;
    return g;
}

} // namespace

class JitConv2d : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t>> {};

// kernel size x stride x padding, each at several sparsities and thread counts.
TEST_P(JitConv2d, matches_reference_on_every_tier) {
    const auto [k, stride, pad] = GetParam();
    int threads = 1;
    for (double sparsity : {0.0, 0.6, 0.95, 1.0}) {
        const conv_case c{3,       5, 6,
                          9,       8, geometry(k, k, stride, stride, pad, pad, pad, pad, 1, 1, 1),
                          sparsity};
        if (c.h + 2 * pad < k || c.w + 2 * pad < k) continue;
        compare_with_reference(c, threads, static_cast<unsigned>(k * 100 + stride * 10 + pad));
        threads = threads % 3 + 1;
    }
}

INSTANTIATE_TEST_SUITE_P(kernel_stride_padding, JitConv2d,
                         ::testing::Combine(::testing::Values(1, 3, 5, 7),
                                            ::testing::Values(1, 2, 3),
                                            ::testing::Values(0, 1, 3)));

TEST(JitConv2dEdges, non_square_asymmetric_dilated_grouped_depthwise) {
    const std::vector<conv_case> cases = {
            {2, 3, 4, 11, 9, geometry(3, 5, 2, 1, 0, 1, 2, 3, 1, 1, 1), 0.5},
            {2, 3, 4, 12, 12, geometry(3, 3, 1, 2, 2, 2, 3, 3, 2, 3, 1), 0.7},
            {3, 6, 9, 7, 10, geometry(3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 3), 0.6},
            {2, 8, 8, 9, 9, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8), 0.3}, // depthwise
            {2, 17, 17, 5, 7, geometry(3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 17),
             0.0},                                                             // depthwise, strided
            {1, 3, 5, 1, 1, geometry(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1), 0.2},   // 1x1 image
            {2, 1, 3, 5, 7, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.4},   // one input channel
            {4, 3, 8, 23, 23, geometry(7, 7, 2, 2, 3, 3, 3, 3, 1, 1, 1), 0.8}, // a stem
            {2, 4, 6, 6, 6, geometry(2, 4, 3, 2, 0, 2, 1, 0, 2, 1, 2), 0.5},   // stride > kernel
            // channels in several groups of the width kernels (f32 and s8)
            {1, 120, 120, 24, 24, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.9},
            {2, 40, 24, 40, 40, geometry(3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1), 0.8},
            // tall and narrow: the width kernels' most rows a block (AVX-512:
            // 13, 13, 11; AVX2 f32 and s8 pairs: five of 7 and 2, all 14
            // sums), over several groups
            {2, 40, 8, 37, 13, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.85},
            // s8 backward-weights' flat rows (an image a row) in two chunks
            // of AVX-512 vectors, dilated
            {3, 6, 8, 40, 41, geometry(3, 3, 1, 1, 2, 2, 2, 2, 2, 2, 1), 0.7},
    };
    compare_cases(cases, 50);
}

// Output rows of whole vectors (16 and 32 columns): on AVX-512's aligned
// sources a row's last vector then reaches past its vector boundary at
// every shift but 0 and reads the next vector too (the rotated loads of
// sparse_kernel_params::shifts), at shifts up to 4 (5x5, dilated).
TEST(JitConv2dEdges, rows_of_whole_vectors_at_every_shift) {
    const std::vector<conv_case> cases = {
            {2, 5, 7, 6, 16, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.5},
            {2, 5, 7, 5, 32, geometry(5, 5, 1, 1, 2, 2, 2, 2, 1, 1, 1), 0.6},
            {1, 6, 4, 6, 34, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 1), 0.4},
            {2, 4, 3, 4, 48, geometry(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1), 0.3},
    };
    compare_cases(cases, 70);
}

// Rows narrower than a vector at stride 1 run flat (an image's rows at the
// padded width as one kernel row; the SpMM drops the lanes past each row,
// the f32 SDDMM's dY is zero there): 7, 5,
// 4 and 3 columns on AVX-512, 3 and 4 on AVX2, through padding on one side
// only, dilation, a 1x1 kernel, odd channel counts (s8 words part empty),
// batches not a multiple of a block's images, several source groups.
TEST(JitConv2dEdges, narrow_rows_run_flat) {
    using detail::direction;
    const direction dirs[] = {direction::forward, direction::backward_data,
                              direction::backward_weights};
    std::vector<int64_t> before;
    for (direction d : dirs)
        before.push_back(detail::flat_width_runs_for_testing(d));
    const std::vector<conv_case> cases = {
            {3, 5, 6, 7, 7, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.5},
            {1, 4, 3, 5, 5, geometry(5, 5, 1, 1, 2, 2, 2, 2, 1, 1, 1), 0.6},
            {17, 3, 5, 4, 4, geometry(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1), 0.3},
            {2, 6, 7, 3, 3, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.4},
            {3, 5, 4, 8, 5, geometry(3, 3, 1, 1, 0, 2, 1, 0, 1, 1, 1), 0.5},
            {2, 3, 5, 7, 7, geometry(3, 3, 1, 1, 2, 2, 2, 2, 2, 2, 1), 0.5},
            {2, 9, 6, 9, 9, geometry(3, 3, 1, 1, 0, 0, 0, 0, 1, 1, 1), 0.5},
            {5, 120, 72, 7, 7, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.9},
    };
    compare_cases(cases, 120);
    if (effective_cpu_isa() < cpu_isa::avx2) return; // the reference has no plans
    for (size_t i = 0; i < before.size(); ++i)
        EXPECT_GT(detail::flat_width_runs_for_testing(dirs[i]), before[i])
                << detail::to_string(dirs[i]) << ": no case ran flat, the cases no longer test it";
}

TEST(JitConv2dEdges, odd_channel_counts_and_batches) {
    unsigned seed = 80;
    for (int64_t n : {1, 3, 17, 65})
        compare_with_reference({n, 3, 4, 5, 6, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.5}, 2,
                               seed++);
    for (int64_t ch : {1, 3, 17})
        compare_with_reference(
                {2, ch, ch + 2, 6, 5, geometry(3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1), 0.7}, 3, seed++);
}

// One layer, one plan per direction, batch sizes changing between calls.
TEST(JitConv2dEdges, batch_size_changes_share_one_plan) {
    std::mt19937 rng(90);
    const conv_case base{0, 4, 6, 7, 7, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.8};
    const int64_t cols = 4 * 9;
    auto w = csr_weights::from_dense(random_sparse_dense(6, cols, 0.8, rng).data(), 6, cols);
    auto bias = random_vector(6, rng);
    set_verbose_level(1);
    testing::internal::CaptureStdout();
    for (int64_t n : {5, 64, 1, 70, 5}) {
        conv_case c = base;
        c.batch = n;
        auto x = random_vector(static_cast<size_t>(n * 4 * 49), rng);
        auto dy = random_vector(static_cast<size_t>(n * 6 * 49), rng);
        for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8})
            for (conv_vectorization v : strategies) {
                const outputs got = run(c, w, x, dy, bias, scheme, 2, "", v);
                const outputs want = run(c, w, x, dy, bias, scheme, 2, "ref:any");
                if (scheme == quant_scheme::s8) {
                    expect_bitwise(got.y, want.y, "forward");
                    expect_bitwise(got.dx, want.dx, "backward_data");
                    expect_bitwise(got.dw, want.dw, "backward_weights");
                } else {
                    expect_close(got.y, want.y, cols + 1, "forward");
                    expect_close(got.dx, want.dx, 6 * 9, "backward_data");
                    expect_close(got.dw, want.dw, n * 49 + 1, "backward_weights");
                }
            }
    }
    const std::string out = testing::internal::GetCapturedStdout();
    set_verbose_level(0);
    if (effective_cpu_isa() < cpu_isa::avx2) return; // the reference has no plans
    size_t generated = 0;
    for (size_t at = out.find(",generated,"); at != std::string::npos;
         at = out.find(",generated,", at + 1))
        ++generated;
    EXPECT_EQ(generated, 12u) << "one plan per direction, scheme and vectorization, whatever "
                                 "the batch size:\n"
                              << out;
}

} // namespace qsp::test

namespace qsp::test {

// An Inf in x or a NaN in dY reaches every output a dense convolution
// would reach (0 * Inf = NaN at the pruned weights), whichever
// vectorization runs: the width kernels' packs check their inputs.
TEST(JitConv2dEdges, non_finite_inputs_follow_dense_semantics) {
    std::mt19937 rng(95);
    const conv_case c{2, 3, 4, 6, 7, geometry(3, 3, 1, 2, 1, 1, 1, 1, 1, 1, 1), 0.7};
    const int64_t cols = 3 * 9;
    auto w = csr_weights::from_dense(random_sparse_dense(4, cols, 0.7, rng).data(), 4, cols);
    const auto o = conv2d_output_hw(c.g, c.h, c.w);
    auto x = random_vector(static_cast<size_t>(2 * 3 * 6 * 7), rng);
    auto dy = random_vector(static_cast<size_t>(2 * 4 * o[0] * o[1]), rng);
    auto bias = random_vector(4, rng);
    x[40] = INFINITY;
    dy[9] = NAN;
    const outputs want = run(c, w, x, dy, bias, quant_scheme::f32, 2, "ref:any");
    size_t nan_y = 0;
    for (float v : want.y)
        nan_y += std::isnan(v);
    ASSERT_GT(nan_y, 4u) << "the Inf must reach outputs through pruned weights too";
    for (isa_level isa : isa_levels())
        for (conv_vectorization v : strategies) {
            if (isa == cpu_isa::ref) continue;
            isa_cap_guard cap(isa);
            SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(v));
            const outputs got = run(c, w, x, dy, bias, quant_scheme::f32, 2, "", v);
            for (size_t i = 0; i < want.y.size(); ++i)
                ASSERT_EQ(std::isnan(got.y[i]), std::isnan(want.y[i])) << "y[" << i << "]";
            for (size_t i = 0; i < want.dx.size(); ++i)
                ASSERT_EQ(std::isnan(got.dx[i]), std::isnan(want.dx[i])) << "dx[" << i << "]";
        }
}

} // namespace qsp::test

namespace qsp::test {

primitive_attr onednn_s8_attr() {
    primitive_attr attr;
    attr.implementation = "dense:onednn_s8";
    return attr;
}

// A case's forward descriptor on dense:onednn_s8, with the memory
// descriptors and attributes its backward descriptors are asked with.
struct onednn_s8_forward {
    dnnl::memory::desc src, dst;
    primitive_attr attr = onednn_s8_attr();
    sparse_conv2d_forward::primitive_desc pd;
    onednn_s8_forward(const dnnl::engine &eng, const conv_case &c, const csr_weights &w)
        : src(f32_desc({c.batch, c.in_c, c.h, c.w})),
          dst(f32_desc({c.batch, c.out_c, conv2d_output_hw(c.g, c.h, c.w)[0],
                        conv2d_output_hw(c.g, c.h, c.w)[1]})),
          pd(eng, prop_kind::forward_training, src, w.pattern, dnnl::memory::desc(), dst, c.g,
             quant_scheme::s8, attr) {}
};

// dense:onednn_s8 (oneDNN int8 convolution forward, int8 deconvolution for
// backward-data) gives the reference's results bit for bit; it refuses
// backward-weights (oneDNN has no int8 form; the sparse JIT runs it).
TEST(DenseOnednnConv2d, matches_the_reference_bit_for_bit) {
    if (!onednn_has_vnni() || effective_cpu_isa() == cpu_isa::ref)
        GTEST_SKIP() << "oneDNN int8 is exact only with VNNI/AMX; refusal tested in S8Scheme";
    const std::vector<conv_case> cases = {
            {2, 5, 6, 9, 8, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 0.6},
            {3, 4, 8, 11, 9, geometry(3, 5, 2, 1, 0, 1, 2, 3, 1, 1, 1), 0.5},
            {2, 3, 4, 12, 12, geometry(3, 3, 1, 2, 2, 2, 3, 3, 2, 3, 1), 0.7},
            {2, 6, 9, 7, 10, geometry(3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 3), 0.6},
            {2, 8, 8, 9, 9, geometry(3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8), 0.3},   // depthwise
            {2, 3, 8, 23, 23, geometry(7, 7, 2, 2, 3, 3, 3, 3, 1, 1, 1), 0.8}, // a stem
            {1, 17, 3, 1, 1, geometry(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1), 0.2},
    };
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    unsigned seed = 300;
    for (const conv_case &c : cases) {
        SCOPED_TRACE(c.str());
        std::mt19937 rng(seed++);
        const auto [cols, w, o, x, dy, bias] = draw_case(c, rng);
        const outputs want = run(c, w, x, dy, bias, quant_scheme::s8, 2, "ref:any");
        const outputs got = run_dense_fwd_bwd_data(c, w, x, dy, bias, 2);
        expect_bitwise(got.y, want.y, "forward");
        expect_bitwise(got.dx, want.dx, "backward_data");
        EXPECT_EQ(got.impl, "dense:onednn_s8/dense:onednn_s8");
        // backward-weights is refused, naming why
        const onednn_s8_forward f(eng, c, w);
        try {
            sparse_conv2d_backward_weights::primitive_desc(
                    eng, f.src, w.pattern, dnnl::memory::desc(), f.dst, f.pd, f.attr);
            ADD_FAILURE() << "dense:onednn_s8 accepted a Conv2d backward-weights";
        } catch (const std::invalid_argument &e) {
            EXPECT_NE(std::string(e.what()).find("no int8 backward-weights"), std::string::npos)
                    << e.what();
        }
    }
}

// Input rows or columns that no window reads (between windows: a stride
// past the kernel's reach, dilation gaps) have a zero gradient, which
// oneDNN's int8 deconvolution leaves unwritten (its buffer's garbage came
// back through the reorder: found by the property tests); where the last
// ones are unread no deconvolution geometry exists. dense:onednn_s8
// refuses their backward-data, naming why (forward it takes), and the
// default choice equals the reference bit for bit, those rows zero.
TEST(DenseOnednnConv2d, refuses_backward_data_where_windows_skip_input_rows) {
    if (!onednn_has_vnni() || effective_cpu_isa() == cpu_isa::ref)
        GTEST_SKIP() << "oneDNN int8 is exact only with VNNI/AMX; refusal tested in S8Scheme";
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    const std::vector<conv_case> cases = {
            {1, 1, 1, 4, 2, geometry(1, 2, 3, 2, 0, 0, 0, 0, 1, 1, 1), 0.0},  // the finding
            {2, 3, 4, 9, 11, geometry(3, 1, 2, 3, 1, 1, 0, 0, 1, 1, 1), 0.3}, // columns skipped
            {2, 2, 3, 8, 8, geometry(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 1), 0.2},  // dilation gaps
            {2, 4, 6, 6, 6, geometry(2, 4, 3, 2, 0, 2, 1, 0, 2, 1, 2), 0.5},  // the last column
    };
    unsigned seed = 500;
    for (const conv_case &c : cases) {
        SCOPED_TRACE(c.str());
        std::mt19937 rng(seed++);
        const auto [cols, w, o, x, dy, bias] = draw_case(c, rng);
        const onednn_s8_forward f(eng, c, w);
        try {
            sparse_conv2d_backward_data::primitive_desc(eng, f.src, w.pattern, f.dst, f.pd, f.attr);
            ADD_FAILURE() << "dense:onednn_s8 accepted a backward-data with unread input rows";
        } catch (const std::invalid_argument &e) {
            EXPECT_NE(std::string(e.what()).find("never reads some input rows or columns"),
                      std::string::npos)
                    << e.what();
        }
        const outputs want = run(c, w, x, dy, bias, quant_scheme::s8, 2, "ref:any");
        const outputs got = run(c, w, x, dy, bias, quant_scheme::s8, 2, "");
        expect_bitwise(got.y, want.y, "forward");
        expect_bitwise(got.dx, want.dx, "backward_data");
        expect_bitwise(got.dw, want.dw, "backward_weights");
    }
}

} // namespace qsp::test

namespace qsp::test {

// The s8 backward-weights reduction over N x OH x OW = 32 x 56 x 56 terms of
// the largest products: sum (G + 128) * X alone would reach 255 * 127 *
// 100352 > 2^31, so every implementation has to split it (int32 pieces
// moved into int64). Every tier and vectorization equals the reference bit
// for bit, and the reference equals the exact product.
TEST(JitConv2dEdges, s8_backward_weights_reduction_of_32x56x56_does_not_overflow) {
    for (int64_t k : {1, 3}) {
        SCOPED_TRACE("kernel " + std::to_string(k));
        const conv_case c{
                32, 1, 2, 56, 56, geometry(k, k, 1, 1, k / 2, k / 2, k / 2, k / 2, 1, 1, 1), 0.0};
        std::vector<float> dense(static_cast<size_t>(2 * k * k), 0.5f);
        auto w = csr_weights::from_dense(dense.data(), 2, k * k);
        std::vector<float> x(static_cast<size_t>(32 * 56 * 56), 1.f); // quantizes to 127
        std::vector<float> dy(static_cast<size_t>(32 * 2 * 56 * 56), 1.f);
        std::vector<float> bias(2, 0.f);
        const outputs want = run(c, w, x, dy, bias, quant_scheme::s8, 2, "ref:any");
        // centre tap: every one of the 100352 terms is 127 * 127 (scales 1/127)
        const size_t centre = static_cast<size_t>(k * k / 2);
        EXPECT_FLOAT_EQ(want.dw[centre], static_cast<float>(32 * 56 * 56));
        for (isa_level isa : isa_levels())
            for (conv_vectorization v : strategies) {
                if (isa == cpu_isa::ref) continue;
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(v));
                const outputs got = run(c, w, x, dy, bias, quant_scheme::s8, 2, "", v);
                expect_bitwise(got.dw, want.dw, "backward_weights");
            }
    }
}

// One lane of the width SDDMM gets more products of 255 * 127 than int32
// holds, so its partial sums must move to int64 on the way: down a tall
// image (stride 2: an output row per row of the image, 4 columns x 17000
// rows a lane) and across a batch (stride 1: an image is one row of the
// flat SDDMM, 70 images x 4 columns of each of its 16384-byte rows' vectors).
TEST(JitConv2dEdges, s8_backward_weights_moves_partial_sums_to_int64) {
    for (const conv_case c :
         {conv_case{1, 1, 1, 34000, 8, geometry(1, 1, 2, 2, 0, 0, 0, 0, 1, 1, 1), 0.0},
          conv_case{70, 1, 1, 128, 128, geometry(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1), 0.0}}) {
        SCOPED_TRACE(c.str());
        std::vector<float> one(1, 1.f), bias(1, 0.f);
        auto w = csr_weights::from_dense(one.data(), 1, 1);
        const int64_t n = c.batch * c.h * c.w, out = n / c.g.stride_h / c.g.stride_w;
        std::vector<float> x(static_cast<size_t>(n), 1.f), dy(static_cast<size_t>(out), 1.f);
        const outputs want = run(c, w, x, dy, bias, quant_scheme::s8, 1, "ref:any");
        EXPECT_FLOAT_EQ(want.dw[0], static_cast<float>(out));
        for (isa_level isa : isa_levels())
            for (conv_vectorization v : strategies) {
                if (isa == cpu_isa::ref) continue;
                isa_cap_guard cap(isa);
                SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(v));
                const outputs got = run(c, w, x, dy, bias, quant_scheme::s8, 1, "", v);
                expect_bitwise(got.dw, want.dw, "backward_weights");
            }
    }
}

} // namespace qsp::test
