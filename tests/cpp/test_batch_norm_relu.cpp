// BatchNorm (+ ReLU) of the fused Conv2d block (qsp::batch_norm_relu_*):
// against a double-precision model of torch.nn.BatchNorm2d's arithmetic over
// odd shapes (planes of 1, 7, 63, 65 elements; planes and mask bytes that
// straddle the passes' chunks), batch and running statistics, with and
// without ReLU and affine parameters, 1-3 threads (results must not depend
// on them), in place, and the argument checks.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "qsparseprop/qsparseprop.hpp"
#include "qsparseprop/quantization.hpp"
#include "test_utils.hpp"

namespace qsp::test {

namespace {

struct case_t {
    int64_t batch, channels, spatial;
};

const case_t cases[] = {{1, 1, 2},           {4, 1, 1},   {1, 3, 7},
                        {2, 5, 65},          {3, 17, 63}, {2, 2, 3 * 4096 + 5},
                        {1, 2, 8 * 4096 + 3}};

struct inputs_t {
    std::vector<float> x, dz, gamma, beta, running_mean, running_var;
};

inputs_t make_inputs(const case_t &c, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> positive(0.5f, 2.0f);
    inputs_t in;
    const int64_t n = c.batch * c.channels * c.spatial;
    in.x.resize(n);
    in.dz.resize(n);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t ch = (i / c.spatial) % c.channels;
        in.x[i] = 3.0f * normal(rng) + static_cast<float>(ch); // channels differ in mean
        in.dz[i] = normal(rng);
    }
    for (int64_t ch = 0; ch < c.channels; ++ch) {
        in.gamma.push_back(positive(rng));
        in.beta.push_back(normal(rng));
        in.running_mean.push_back(normal(rng));
        in.running_var.push_back(positive(rng));
    }
    return in;
}

struct result_t {
    std::vector<float> z, mean, invstd, var, dx, dgamma, dbeta;
    std::vector<uint8_t> mask;
};

result_t run(const case_t &c, const inputs_t &in, bool batch_statistics, bool relu, bool affine,
             int threads) {
    batch_norm_relu_desc d;
    d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial;
    d.batch_statistics = batch_statistics;
    d.relu = relu;
    const int64_t n = c.batch * c.channels * c.spatial;
    result_t r;
    r.z.assign(n, 42.0f);
    r.mask.assign((n + 7) / 8, 0xAB);
    r.mean.resize(c.channels);
    r.invstd.resize(c.channels);
    r.var.resize(c.channels);
    const float *gamma = affine ? in.gamma.data() : nullptr;
    batch_norm_relu_forward(d, in.x.data(), gamma, affine ? in.beta.data() : nullptr,
                            in.running_mean.data(), in.running_var.data(), r.z.data(),
                            r.mask.data(), r.mean.data(), r.invstd.data(), r.var.data(), threads);
    r.dx.assign(n, 42.0f);
    r.dgamma.resize(c.channels);
    r.dbeta.resize(c.channels);
    batch_norm_relu_backward(d, in.dz.data(), r.mask.data(), in.x.data(), gamma, r.mean.data(),
                             r.invstd.data(), r.dx.data(), r.dgamma.data(), r.dbeta.data(),
                             threads);
    return r;
}

bool bit(const std::vector<uint8_t> &mask, int64_t i) {
    return (mask[i / 8] >> (i % 8)) & 1;
}

// torch.nn.BatchNorm2d (+ ReLU) in double; the backward masks with the
// forward's bits (the contract: the mask says where the output was > 0).
void check_against_model(const case_t &c, const inputs_t &in, const result_t &r,
                         bool batch_statistics, bool relu, bool affine) {
    const int64_t count = c.batch * c.spatial;
    const auto at = [&](int64_t b, int64_t ch, int64_t s) {
        return (b * c.channels + ch) * c.spatial + s;
    };
    for (int64_t ch = 0; ch < c.channels; ++ch) {
        double mean = in.running_mean[ch], var = in.running_var[ch];
        if (batch_statistics) {
            double sum = 0, squares = 0;
            for (int64_t b = 0; b < c.batch; ++b)
                for (int64_t s = 0; s < c.spatial; ++s)
                    sum += in.x[at(b, ch, s)];
            mean = sum / count;
            for (int64_t b = 0; b < c.batch; ++b)
                for (int64_t s = 0; s < c.spatial; ++s)
                    squares += (in.x[at(b, ch, s)] - mean) * (in.x[at(b, ch, s)] - mean);
            var = squares / count;
            ASSERT_NEAR(r.var[ch], var, 1e-5 * (1 + var)) << "channel " << ch;
        }
        const double inv = 1.0 / std::sqrt(var + 1e-5);
        ASSERT_NEAR(r.mean[ch], mean, 1e-5 * (1 + std::fabs(mean))) << "channel " << ch;
        ASSERT_NEAR(r.invstd[ch], inv, 1e-5 * inv) << "channel " << ch;
        const double w = affine ? in.gamma[ch] : 1.0, b0 = affine ? in.beta[ch] : 0.0;
        double sum_g = 0, sum_g_xhat = 0, magnitude = 0;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t s = 0; s < c.spatial; ++s) {
                const int64_t i = at(b, ch, s);
                const double xhat = (in.x[i] - mean) * inv, y = xhat * w + b0;
                const double want = relu ? std::max(0.0, y) : y;
                ASSERT_NEAR(r.z[i], want, 1e-5 * (1 + std::fabs(y)))
                        << "channel " << ch << " i " << i;
                if (relu) ASSERT_EQ(bit(r.mask, i), !(r.z[i] <= 0.0f)) << "i " << i;
                const double g = !relu || bit(r.mask, i) ? in.dz[i] : 0.0;
                sum_g += g;
                sum_g_xhat += g * xhat;
                magnitude += std::fabs(g) * (1 + std::fabs(xhat));
            }
        const double tol = 1e-5 * magnitude + 1e-6;
        ASSERT_NEAR(r.dbeta[ch], sum_g, tol) << "channel " << ch;
        ASSERT_NEAR(r.dgamma[ch], sum_g_xhat, tol) << "channel " << ch;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t s = 0; s < c.spatial; ++s) {
                const int64_t i = at(b, ch, s);
                const double xhat = (in.x[i] - mean) * inv;
                const double g = !relu || bit(r.mask, i) ? in.dz[i] : 0.0;
                const double want =
                        batch_statistics ? (g - sum_g / count - xhat * sum_g_xhat / count) * inv * w
                                         : g * inv * w;
                ASSERT_NEAR(r.dx[i], want, 1e-4 * inv * w * (1 + std::fabs(g)))
                        << "channel " << ch << " i " << i;
            }
    }
}

bool same(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The int8 copy of src (the int8 blocks' saved BatchNorm input).
struct s8_result_t {
    result_t r;
    std::vector<int8_t> centered;
    std::vector<float> step;
    std::vector<float> dx_abs_max; // per channel, as the backward found it
    float z_abs_max = -1.0f;       // max |z|, as the forward found it
};

s8_result_t run_s8(const case_t &c, const inputs_t &in, bool relu, bool affine, int threads,
                   bool in_place = false) {
    batch_norm_relu_desc d;
    d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial, d.relu = relu;
    const int64_t n = c.batch * c.channels * c.spatial;
    s8_result_t o;
    result_t &r = o.r;
    r.z = in_place ? in.x : std::vector<float>(n, 42.0f);
    r.mask.assign((n + 7) / 8, 0xAB);
    r.mean.resize(c.channels);
    r.invstd.resize(c.channels);
    r.var.resize(c.channels);
    o.centered.assign(n, 99);
    o.step.assign(c.channels, 42.0f);
    const float *gamma = affine ? in.gamma.data() : nullptr;
    batch_norm_relu_forward(d, in_place ? r.z.data() : in.x.data(), gamma,
                            affine ? in.beta.data() : nullptr, nullptr, nullptr, r.z.data(),
                            r.mask.data(), r.mean.data(), r.invstd.data(), r.var.data(),
                            o.centered.data(), o.step.data(), &o.z_abs_max, threads);
    r.dx = in_place ? in.dz : std::vector<float>(n, 42.0f);
    r.dgamma.resize(c.channels);
    r.dbeta.resize(c.channels);
    o.dx_abs_max.assign(c.channels, -1.0f);
    batch_norm_relu_backward(d, in_place ? r.dx.data() : in.dz.data(), r.mask.data(),
                             o.centered.data(), o.step.data(), gamma, r.invstd.data(), r.dx.data(),
                             r.dgamma.data(), r.dbeta.data(), o.dx_abs_max.data(), threads);
    return o;
}

int64_t n_of(const case_t &c) {
    return c.batch * c.channels * c.spatial;
}

// Each channel's lowest and highest element of an NCHW x (lowest, highest
// per channel): the range the convolution's statistics give the BatchNorm.
std::vector<float> channel_ranges(const case_t &c, const std::vector<float> &x) {
    std::vector<float> range(2 * c.channels);
    for (int64_t ch = 0; ch < c.channels; ++ch) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t i = 0; i < c.spatial; ++i) {
                const float v = x[(b * c.channels + ch) * c.spatial + i];
                lo = std::min(lo, v), hi = std::max(hi, v);
            }
        range[2 * ch] = lo, range[2 * ch + 1] = hi;
    }
    return range;
}

// max |dx| per channel of an NCHW dx (NaN where the channel holds one).
std::vector<float> channel_abs_max(const case_t &c, const std::vector<float> &dx) {
    std::vector<float> m(c.channels, 0.0f);
    for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t ch = 0; ch < c.channels; ++ch)
            for (int64_t i = 0; i < c.spatial; ++i) {
                const float v = dx[(b * c.channels + ch) * c.spatial + i];
                m[ch] = std::isnan(m[ch]) || std::isnan(v) ? NAN : std::max(m[ch], std::fabs(v));
            }
    return m;
}

// The scheme's rule, written out independently: step = max |x - mean| / 127
// in float, values = nearbyint((x - mean) * (1 / step)) clamped.
void check_centering(const case_t &c, const inputs_t &in, const s8_result_t &o) {
    for (int64_t ch = 0; ch < c.channels; ++ch) {
        const float m = o.r.mean[ch];
        float amax = 0;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t s = 0; s < c.spatial; ++s)
                amax = std::max(amax, std::fabs(in.x[(b * c.channels + ch) * c.spatial + s] - m));
        const quant_scale q = quant_scale_from_abs_max(amax);
        ASSERT_EQ(o.step[ch], q.scale) << "channel " << ch;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t s = 0; s < c.spatial; ++s) {
                const int64_t i = (b * c.channels + ch) * c.spatial + s;
                const float want =
                        std::min(127.0f, std::max(-127.0f, std::nearbyint((in.x[i] - m) * q.inv)));
                ASSERT_EQ(o.centered[i], static_cast<int8_t>(want))
                        << "channel " << ch << " i " << i;
            }
    }
}

// The backward in double from the centered values: torch's formula with
// x - mean = centered * step.
void check_s8_backward(const case_t &c, const inputs_t &in, const s8_result_t &o, bool relu,
                       bool affine) {
    const int64_t count = c.batch * c.spatial;
    for (int64_t ch = 0; ch < c.channels; ++ch) {
        const double inv = o.r.invstd[ch], w = affine ? in.gamma[ch] : 1.0;
        const auto at = [&](int64_t b, int64_t s) { return (b * c.channels + ch) * c.spatial + s; };
        const auto g_at = [&](int64_t i) {
            return !relu || bit(o.r.mask, i) ? static_cast<double>(in.dz[i]) : 0.0;
        };
        double sum_g = 0, dot = 0, magnitude = 0;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t s = 0; s < c.spatial; ++s) {
                const int64_t i = at(b, s);
                const double xc = o.centered[i] * static_cast<double>(o.step[ch]);
                sum_g += g_at(i);
                dot += g_at(i) * xc;
                magnitude += std::fabs(g_at(i)) * (1 + std::fabs(xc * inv));
            }
        const double tol = 1e-5 * magnitude + 1e-6;
        ASSERT_NEAR(o.r.dbeta[ch], sum_g, tol) << "channel " << ch;
        ASSERT_NEAR(o.r.dgamma[ch], dot * inv, tol) << "channel " << ch;
        for (int64_t b = 0; b < c.batch; ++b)
            for (int64_t s = 0; s < c.spatial; ++s) {
                const int64_t i = at(b, s);
                const double xhat = o.centered[i] * static_cast<double>(o.step[ch]) * inv;
                const double want = (g_at(i) - sum_g / count - xhat * dot * inv / count) * inv * w;
                ASSERT_NEAR(o.r.dx[i], want, 1e-4 * inv * w * (1 + std::fabs(g_at(i))))
                        << "channel " << ch << " i " << i;
            }
    }
}

double relative_l2(const std::vector<float> &got, const std::vector<float> &want) {
    double err = 0, norm = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
        norm += double(want[i]) * want[i];
    }
    return std::sqrt(err / std::max(norm, 1e-30));
}

} // namespace

TEST(BatchNormRelu, matches_the_model_over_odd_shapes_and_is_thread_count_independent) {
    uint32_t seed = 1;
    for (const case_t &c : cases)
        for (bool batch_statistics : {true, false})
            for (bool relu : {true, false})
                for (bool affine : {true, false}) {
                    SCOPED_TRACE(testing::Message()
                                 << "N=" << c.batch << " C=" << c.channels << " S=" << c.spatial
                                 << " batch_statistics=" << batch_statistics << " relu=" << relu
                                 << " affine=" << affine);
                    const inputs_t in = make_inputs(c, seed++);
                    const result_t one = run(c, in, batch_statistics, relu, affine, 1);
                    check_against_model(c, in, one, batch_statistics, relu, affine);
                    for (int threads : {2, 3}) {
                        const result_t other = run(c, in, batch_statistics, relu, affine, threads);
                        ASSERT_TRUE(same(one.z, other.z) && same(one.dx, other.dx)
                                    && same(one.mean, other.mean) && same(one.var, other.var)
                                    && same(one.dgamma, other.dgamma) && one.mask == other.mask)
                                << threads << " threads differ from 1";
                    }
                    if (relu) { // bits beyond the elements are zero
                        const int64_t n = c.batch * c.channels * c.spatial;
                        for (int64_t i = n; i < static_cast<int64_t>(one.mask.size()) * 8; ++i)
                            ASSERT_FALSE(bit(one.mask, i));
                    }
                }
}

TEST(BatchNormRelu, drops_a_nan_gradient_where_the_relu_was_off_as_torch_does) {
    const case_t c{2, 3, 9};
    inputs_t in = make_inputs(c, 7);
    const result_t r0 = run(c, in, true, true, true, 2);
    int64_t off = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(in.x.size()) && off < 0; ++i)
        if (!bit(r0.mask, i)) off = i;
    ASSERT_GE(off, 0);
    in.dz[off] = std::nanf("");
    const result_t r = run(c, in, true, true, true, 2);
    // the dropped element counts as 0 in every sum: all as without the NaN
    EXPECT_TRUE(same(r.dx, r0.dx));
    EXPECT_TRUE(same(r.dgamma, r0.dgamma) && same(r.dbeta, r0.dbeta));
}

TEST(BatchNormRelu, runs_in_place) {
    const case_t c{3, 4, 17};
    const inputs_t in = make_inputs(c, 11);
    const result_t want = run(c, in, true, true, true, 2);
    batch_norm_relu_desc d;
    d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial, d.relu = true;
    std::vector<float> buf = in.x, mean(c.channels), invstd(c.channels);
    std::vector<uint8_t> mask(want.mask.size());
    batch_norm_relu_forward(d, buf.data(), in.gamma.data(), in.beta.data(), nullptr, nullptr,
                            buf.data(), mask.data(), mean.data(), invstd.data(), nullptr, 2);
    EXPECT_TRUE(same(buf, want.z));
    std::vector<float> g = in.dz;
    batch_norm_relu_backward(d, g.data(), mask.data(), in.x.data(), in.gamma.data(), mean.data(),
                             invstd.data(), g.data(), nullptr, nullptr, 2);
    EXPECT_TRUE(same(g, want.dx));
}

TEST(BatchNormRelu, an_int8_copy_of_src_is_the_exact_centering_and_the_backward_reads_it) {
    uint32_t seed = 101;
    for (const case_t &c : cases)
        for (bool relu : {true, false})
            for (bool affine : {true, false}) {
                SCOPED_TRACE(testing::Message()
                             << "N=" << c.batch << " C=" << c.channels << " S=" << c.spatial
                             << " relu=" << relu << " affine=" << affine);
                const inputs_t in = make_inputs(c, seed++);
                const s8_result_t one = run_s8(c, in, relu, affine, 1);
                // the forward is the f32 forward: only what is kept differs
                const result_t f32 = run(c, in, true, relu, affine, 1);
                ASSERT_TRUE(same(one.r.z, f32.z) && same(one.r.mean, f32.mean)
                            && same(one.r.invstd, f32.invstd) && same(one.r.var, f32.var)
                            && one.r.mask == f32.mask);
                check_centering(c, in, one);
                check_s8_backward(c, in, one, relu, affine);
                ASSERT_TRUE(same(one.dx_abs_max, channel_abs_max(c, one.r.dx)));
                // max |z| from the channels' ranges: the one over z itself
                const std::vector<float> z_max = channel_abs_max({1, 1, n_of(c)}, one.r.z);
                ASSERT_EQ(one.z_abs_max, z_max[0]);
                // and the error of keeping one byte stays within the step:
                // about 1 % of the input gradient (Gaussian channels)
                if (c.batch * c.spatial >= 63) {
                    EXPECT_LT(relative_l2(one.r.dx, f32.dx), 0.02);
                    if (affine) EXPECT_LT(relative_l2(one.r.dgamma, f32.dgamma), 0.02);
                }
                for (int threads : {2, 3}) {
                    const s8_result_t other = run_s8(c, in, relu, affine, threads);
                    ASSERT_TRUE(same(one.r.dx, other.r.dx) && same(one.r.dgamma, other.r.dgamma)
                                && one.centered == other.centered && same(one.step, other.step)
                                && same(one.dx_abs_max, other.dx_abs_max)
                                && one.z_abs_max == other.z_abs_max)
                            << threads << " threads differ from 1";
                }
                const s8_result_t in_place = run_s8(c, in, relu, affine, 2, true);
                ASSERT_TRUE(same(in_place.r.z, one.r.z) && same(in_place.r.dx, one.r.dx)
                            && in_place.centered == one.centered
                            && same(in_place.dx_abs_max, one.dx_abs_max));
            }
}

TEST(BatchNormRelu, an_int8_copy_keeps_a_non_finite_channel_non_finite_and_no_other) {
    const case_t c{2, 3, 9};
    inputs_t in = make_inputs(c, 13);
    const s8_result_t clean = run_s8(c, in, false, true, 2);
    for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
        inputs_t dirty = in;
        dirty.x[1 * c.spatial + 4] = bad; // channel 1 of the first image
        const s8_result_t o = run_s8(c, dirty, false, true, 2);
        EXPECT_TRUE(std::isnan(o.step[1])) << bad;
        for (int64_t ch : {0, 2}) {
            EXPECT_EQ(o.step[ch], clean.step[ch]);
            for (int64_t b = 0; b < c.batch; ++b)
                for (int64_t s = 0; s < c.spatial; ++s) {
                    const int64_t i = (b * c.channels + ch) * c.spatial + s;
                    EXPECT_EQ(o.r.dx[i], clean.r.dx[i]) << "channel " << ch;
                }
        }
        // as torch: a NaN mean makes every gradient of the channel NaN
        EXPECT_TRUE(std::isnan(o.r.dx[1 * c.spatial])) << bad;
        EXPECT_TRUE(std::isnan(o.r.dgamma[1])) << bad;
        // and its maximum NaN (the next layer's scale with it), the others' as before
        EXPECT_TRUE(std::isnan(o.dx_abs_max[1])) << bad;
        EXPECT_TRUE(std::isnan(o.z_abs_max)) << bad;
        EXPECT_EQ(o.dx_abs_max[0], clean.dx_abs_max[0]);
        EXPECT_EQ(o.dx_abs_max[2], clean.dx_abs_max[2]);
    }
}

// max |z| from the channels' ranges where a negative gamma turns a
// channel's lowest src into its largest z, with and without the ReLU, and
// where a constant channel has a zero scale's worth of spread.
TEST(BatchNormRelu, the_outputs_maximum_from_the_ranges_is_the_maximum_over_the_output) {
    for (const case_t &c : {cases[2], cases[3], cases[4]})
        for (bool relu : {true, false}) {
            inputs_t in = make_inputs(c, 23);
            for (size_t ch = 0; ch < in.gamma.size(); ch += 2)
                in.gamma[ch] = -in.gamma[ch];
            for (int64_t b = 0; b < c.batch; ++b)
                for (int64_t i = 0; i < c.spatial; ++i)
                    in.x[(b * c.channels + c.channels - 1) * c.spatial + i] = 1.5f;
            const s8_result_t o = run_s8(c, in, relu, true, 2);
            ASSERT_EQ(o.z_abs_max, channel_abs_max({1, 1, n_of(c)}, o.r.z)[0])
                    << "C=" << c.channels << " relu " << relu;
        }
}

TEST(BatchNormRelu, an_int8_copy_of_a_constant_channel_is_zeros_with_a_zero_step) {
    const case_t c{3, 2, 17};
    inputs_t in = make_inputs(c, 17);
    for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t s = 0; s < c.spatial; ++s)
            in.x[(b * c.channels + 1) * c.spatial + s] = 2.5f;
    const s8_result_t o = run_s8(c, in, true, true, 2);
    EXPECT_EQ(o.step[1], 0.0f);
    check_centering(c, in, o);
    check_s8_backward(c, in, o, true, true);
}

// Statistics src's writer took (the convolution's batch_statistics
// post-op) stand for the statistics pass: the very floats given are the
// batch's (a shifted mean shows they are not found again), and given the
// pass's own, every output is the pass's (invstd within an ulp: the
// variance reaches it as a float).
TEST(BatchNormRelu, known_statistics_stand_for_the_statistics_pass) {
    for (const case_t &c : cases) {
        SCOPED_TRACE(testing::Message() << c.batch << "x" << c.channels << "x" << c.spatial);
        const inputs_t in = make_inputs(c, 21);
        const s8_result_t own = run_s8(c, in, true, true, 2);
        const int64_t n = n_of(c);
        const std::vector<float> range = channel_ranges(c, in.x);
        batch_norm_relu_desc d;
        d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial, d.relu = true;
        auto forward = [&](const std::vector<float> &mean, s8_result_t &o, int threads) {
            const batch_norm_known_statistics known{mean.data(), own.r.var.data(), range.data()};
            o.r.z.assign(n, 42.0f);
            o.r.mask.assign((n + 7) / 8, 0xAB);
            o.r.mean.assign(c.channels, 42.0f);
            o.r.invstd.assign(c.channels, 42.0f);
            o.r.var.assign(c.channels, 42.0f);
            o.centered.assign(n, 99);
            o.step.assign(c.channels, 42.0f);
            batch_norm_relu_forward(d, in.x.data(), in.gamma.data(), in.beta.data(), nullptr,
                                    nullptr, o.r.z.data(), o.r.mask.data(), o.r.mean.data(),
                                    o.r.invstd.data(), o.r.var.data(), o.centered.data(),
                                    o.step.data(), &o.z_abs_max, threads, &known);
        };
        s8_result_t given, given3;
        forward(own.r.mean, given, 1);
        forward(own.r.mean, given3, 3);
        EXPECT_TRUE(same(given.r.z, given3.r.z)) << "threads";
        EXPECT_TRUE(same(given.r.mean, own.r.mean) && same(given.r.var, own.r.var));
        EXPECT_TRUE(same(given.step, own.step));
        EXPECT_EQ(given.centered, own.centered);
        EXPECT_EQ(given.r.mask, own.r.mask);
        for (int64_t ch = 0; ch < c.channels; ++ch)
            EXPECT_NEAR(given.r.invstd[ch], own.r.invstd[ch], 2e-7 * own.r.invstd[ch]) << ch;
        for (int64_t i = 0; i < n; ++i)
            ASSERT_NEAR(given.r.z[i], own.r.z[i], 1e-5 * (1 + std::fabs(own.r.z[i]))) << i;
        std::vector<float> shifted = own.r.mean;
        for (float &m : shifted)
            m += 1.0f;
        s8_result_t moved;
        forward(shifted, moved, 2);
        EXPECT_TRUE(same(moved.r.mean, shifted)) << "the given mean is the batch's";
    }
}

// The forward that writes its dst only as the next s8 convolution would
// quantize it: the integers are quantize_rne's of the dst the plain int8
// forward writes (the scale from max |dst|), and everything else it
// writes is that forward's, on every thread count, with the pass's own
// statistics or given ones; a non-finite channel makes the scale NaN and
// the integers zeros, as quantize_rne does.
TEST(BatchNormRelu, the_quantized_forward_is_the_rounding_of_the_dst_it_does_not_write) {
    uint32_t seed = 301;
    for (const case_t &c : cases)
        for (bool relu : {true, false})
            for (bool affine : {true, false}) {
                SCOPED_TRACE(testing::Message()
                             << "N=" << c.batch << " C=" << c.channels << " S=" << c.spatial
                             << " relu=" << relu << " affine=" << affine);
                const inputs_t in = make_inputs(c, seed++);
                const int64_t n = n_of(c);
                batch_norm_relu_desc d;
                d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial, d.relu = relu;
                const float *gamma = affine ? in.gamma.data() : nullptr;
                const float *beta = affine ? in.beta.data() : nullptr;
                const s8_result_t own = run_s8(c, in, relu, affine, 1);
                const std::vector<float> range = channel_ranges(c, in.x);
                const batch_norm_known_statistics known{own.r.mean.data(), own.r.var.data(),
                                                        range.data()};
                for (bool given : {false, true}) {
                    // the plain int8 forward with the same statistics
                    s8_result_t plain;
                    plain.r.z.assign(n, 42.0f), plain.r.mask.assign((n + 7) / 8, 0xAB);
                    plain.r.mean.assign(c.channels, 42.0f), plain.r.invstd = plain.r.mean;
                    plain.r.var = plain.r.mean, plain.step = plain.r.mean;
                    plain.centered.assign(n, 99);
                    batch_norm_relu_forward(
                            d, in.x.data(), gamma, beta, nullptr, nullptr, plain.r.z.data(),
                            plain.r.mask.data(), plain.r.mean.data(), plain.r.invstd.data(),
                            plain.r.var.data(), plain.centered.data(), plain.step.data(),
                            &plain.z_abs_max, 1, given ? &known : nullptr);
                    // quantize_rne's rule over the dst the plain forward wrote
                    const quant_scale rule = quant_scale_from_abs_max(plain.z_abs_max);
                    std::vector<int8_t> expected(n, 0);
                    for (int64_t i = 0; i < n && rule.usable; ++i)
                        expected[i] = static_cast<int8_t>(std::nearbyint(plain.r.z[i] * rule.inv));
                    for (int threads : {1, 3}) {
                        SCOPED_TRACE(testing::Message() << threads << " threads, given " << given);
                        std::vector<int8_t> values(n, 99), centered(n, 99);
                        std::vector<uint8_t> mask((n + 7) / 8, 0xAB);
                        std::vector<float> mean(c.channels, 42.0f), invstd(mean), var(mean),
                                step(mean);
                        float scale = 42.0f;
                        batch_norm_relu_forward_quantized(
                                d, in.x.data(), gamma, beta, {values.data(), &scale}, mask.data(),
                                mean.data(), invstd.data(), var.data(), centered.data(),
                                step.data(), threads, given ? &known : nullptr);
                        ASSERT_EQ(scale, rule.scale);
                        ASSERT_EQ(values, expected);
                        ASSERT_EQ(centered, plain.centered);
                        ASSERT_TRUE(same(step, plain.step) && same(mean, plain.r.mean)
                                    && same(var, plain.r.var) && same(invstd, plain.r.invstd));
                        if (relu) ASSERT_EQ(mask, plain.r.mask);
                    }
                }
            }
    const case_t c{2, 3, 9};
    inputs_t in = make_inputs(c, 31);
    in.x[c.spatial + 4] = std::nanf("");
    batch_norm_relu_desc d;
    d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial, d.relu = true;
    const int64_t n = n_of(c);
    std::vector<int8_t> values(n, 99), centered(n);
    std::vector<uint8_t> mask((n + 7) / 8);
    std::vector<float> mean(3), invstd(3), var(3), step(3);
    float scale = 42.0f;
    batch_norm_relu_forward_quantized(d, in.x.data(), nullptr, nullptr, {values.data(), &scale},
                                      mask.data(), mean.data(), invstd.data(), var.data(),
                                      centered.data(), step.data(), 2);
    EXPECT_TRUE(std::isnan(scale));
    EXPECT_EQ(values, std::vector<int8_t>(n, 0));
    // refused: without batch statistics (no range), without its outputs
    d.batch_statistics = false;
    expect_refusal(
            [&] {
                batch_norm_relu_forward_quantized(
                        d, in.x.data(), nullptr, nullptr, {values.data(), &scale}, mask.data(),
                        mean.data(), invstd.data(), var.data(), centered.data(), step.data(), 1);
            },
            "batch statistics");
    d.batch_statistics = true;
    expect_refusal(
            [&] {
                batch_norm_relu_forward_quantized(
                        d, in.x.data(), nullptr, nullptr, {nullptr, &scale}, mask.data(),
                        mean.data(), invstd.data(), var.data(), centered.data(), step.data(), 1);
            },
            "quantized dst values");
    expect_refusal(
            [&] {
                batch_norm_relu_forward_quantized(
                        d, in.x.data(), nullptr, nullptr, {values.data(), nullptr}, mask.data(),
                        mean.data(), invstd.data(), var.data(), centered.data(), step.data(), 1);
            },
            "quantized dst scale");
}

TEST(BatchNormRelu, refuses_malformed_arguments_with_a_named_reason) {
    std::vector<float> x(12, 1.0f), y(12), m(3), v(3);
    std::vector<uint8_t> mask(2);
    const auto forward = [&](batch_norm_relu_desc d, uint8_t *bits, const float *rm) {
        batch_norm_relu_forward(d, x.data(), nullptr, nullptr, rm, rm, y.data(), bits, m.data(),
                                v.data(), nullptr, 1);
    };
    batch_norm_relu_desc d;
    d.batch = 1, d.channels = 3, d.spatial = 4;
    const auto expect_refusal = [](const auto &f, const char *needle) {
        try {
            f();
            FAIL() << "accepted; expected a refusal naming " << needle;
        } catch (const std::invalid_argument &e) {
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
        }
    };
    batch_norm_relu_desc bad = d;
    bad.channels = 0;
    expect_refusal([&] { forward(bad, nullptr, nullptr); }, "channels");
    bad = d;
    bad.epsilon = -1;
    expect_refusal([&] { forward(bad, nullptr, nullptr); }, "epsilon");
    bad = d;
    bad.epsilon = std::nan("");
    expect_refusal([&] { forward(bad, nullptr, nullptr); }, "epsilon");
    bad = d;
    bad.relu = true;
    expect_refusal([&] { forward(bad, nullptr, nullptr); }, "mask");
    bad = d;
    bad.batch_statistics = false;
    expect_refusal([&] { forward(bad, nullptr, nullptr); }, "running_mean");
    bad = d;
    bad.batch = 0;
    expect_refusal([&] { forward(bad, nullptr, nullptr); }, "empty batch");
    bad.batch_statistics = false; // running statistics of an empty batch: nothing to do
    EXPECT_NO_THROW(forward(bad, nullptr, v.data()));

    std::vector<int8_t> centered(12);
    std::vector<float> step(3);
    const auto forward_s8 = [&](batch_norm_relu_desc dd, int8_t *q, float *st) {
        batch_norm_relu_forward(dd, x.data(), nullptr, nullptr, v.data(), v.data(), y.data(),
                                nullptr, m.data(), v.data(), nullptr, q, st, nullptr, 1);
    };
    bad = d;
    bad.batch_statistics = false;
    expect_refusal([&] { forward_s8(bad, centered.data(), step.data()); }, "batch statistics");
    expect_refusal([&] { forward_s8(d, nullptr, step.data()); }, "centered");
    expect_refusal([&] { forward_s8(d, centered.data(), nullptr); }, "step");
    expect_refusal(
            [&] {
                batch_norm_relu_backward(d, x.data(), nullptr, centered.data(), nullptr, nullptr,
                                         v.data(), y.data(), nullptr, nullptr, nullptr, 1);
            },
            "step");
    // the channel maxima are of diff_src: none without it
    expect_refusal(
            [&] {
                batch_norm_relu_backward(d, x.data(), nullptr, centered.data(), step.data(),
                                         nullptr, v.data(), nullptr, nullptr, nullptr, m.data(), 1);
            },
            "diff_src");
}

// A residual block's end, relu(batch_norm(src) + residual): the same values
// as the BatchNorm alone plus the residual then the ReLU, rounded the same
// way (bit for bit), its backward the BatchNorm's with that mask, and the
// residual's gradient the masked incoming one; f32 source or its int8 copy,
// batch or running statistics, 1-3 threads, dst written over the residual.
TEST(BatchNormRelu, known_statistics_are_refused_where_they_cannot_stand) {
    batch_norm_relu_desc d;
    d.batch = 2, d.channels = 3, d.spatial = 4;
    std::vector<float> x(24, 1.0f), z(24), mean(3), invstd(3), var(3), step(3), stats(3, 1.0f);
    std::vector<float> ones(3, 1.0f), zeros(3, 0.0f);
    std::vector<int8_t> centered(24);
    std::vector<uint8_t> mask(3);
    const batch_norm_known_statistics known{stats.data(), stats.data(), nullptr};
    auto expect_refusal = [](const std::function<void()> &f, const std::string &what) {
        try {
            f();
            ADD_FAILURE() << "accepted: " << what;
        } catch (const std::invalid_argument &e) {
            EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
        }
    };
    d.batch_statistics = false; // running statistics: nothing of the batch's to stand for
    expect_refusal(
            [&] {
                batch_norm_relu_forward(d, x.data(), nullptr, nullptr, zeros.data(), ones.data(),
                                        z.data(), mask.data(), mean.data(), invstd.data(), nullptr,
                                        1, &known);
            },
            "known statistics stand for the batch's");
    d.batch_statistics = true; // the int8 copy needs the range
    expect_refusal(
            [&] {
                batch_norm_relu_forward(d, x.data(), nullptr, nullptr, nullptr, nullptr, z.data(),
                                        mask.data(), mean.data(), invstd.data(), var.data(),
                                        centered.data(), step.data(), nullptr, 1, &known);
            },
            "known range");
    const batch_norm_known_statistics no_variance{stats.data(), nullptr, nullptr};
    expect_refusal(
            [&] {
                batch_norm_relu_forward(d, x.data(), nullptr, nullptr, nullptr, nullptr, z.data(),
                                        mask.data(), mean.data(), invstd.data(), var.data(), 1,
                                        &no_variance);
            },
            "known variance");
}

TEST(BatchNormRelu, a_residual_end_is_the_batch_norm_then_the_add_then_the_relu) {
    uint32_t seed = 100;
    for (const case_t &c : {cases[2], cases[3], cases[4], cases[5]})
        for (bool batch_statistics : {true, false})
            for (bool relu : {true, false})
                for (bool s8 : {false, true}) {
                    if (s8 && !batch_statistics) continue; // the int8 copy needs them
                    SCOPED_TRACE(testing::Message()
                                 << "N=" << c.batch << " C=" << c.channels << " S=" << c.spatial
                                 << " batch_statistics=" << batch_statistics << " relu=" << relu
                                 << " s8=" << s8);
                    const inputs_t in = make_inputs(c, seed++);
                    const int64_t n = c.batch * c.channels * c.spatial;
                    std::vector<float> residual(n);
                    std::mt19937 rng(seed);
                    std::normal_distribution<float> normal;
                    for (auto &v : residual)
                        v = 2.0f * normal(rng);
                    batch_norm_relu_desc d;
                    d.batch = c.batch, d.channels = c.channels, d.spatial = c.spatial;
                    d.batch_statistics = batch_statistics;
                    // the BatchNorm alone (no ReLU), then the add and the ReLU in float
                    batch_norm_relu_desc plain = d;
                    std::vector<float> z0(n), mean(c.channels), invstd(c.channels), var(c.channels);
                    std::vector<int8_t> centered0(s8 ? n : 0);
                    std::vector<float> step0(s8 ? c.channels : 0);
                    std::vector<uint8_t> unused((n + 7) / 8);
                    if (s8)
                        batch_norm_relu_forward(plain, in.x.data(), in.gamma.data(), in.beta.data(),
                                                nullptr, nullptr, z0.data(), unused.data(),
                                                mean.data(), invstd.data(), var.data(),
                                                centered0.data(), step0.data(), nullptr, 1);
                    else
                        batch_norm_relu_forward(plain, in.x.data(), in.gamma.data(), in.beta.data(),
                                                in.running_mean.data(), in.running_var.data(),
                                                z0.data(), unused.data(), mean.data(),
                                                invstd.data(), var.data(), 1);
                    std::vector<float> want(n);
                    for (int64_t i = 0; i < n; ++i) {
                        const float sum = z0[i] + residual[i];
                        want[i] = relu ? std::max(0.0f, sum) : sum;
                    }
                    d.relu = relu;
                    std::vector<float> first_dx, first_dres;
                    for (int threads : {1, 2, 3}) {
                        // dst over the residual (in place) with 2 threads
                        std::vector<float> res_copy = residual;
                        std::vector<float> z(n, 42.0f);
                        float *dst = threads == 2 ? res_copy.data() : z.data();
                        std::vector<uint8_t> mask((n + 7) / 8, 0xAB);
                        std::vector<float> m(c.channels), inv(c.channels), v(c.channels);
                        std::vector<int8_t> centered(s8 ? n : 0, 99);
                        std::vector<float> step(s8 ? c.channels : 0, 42.0f);
                        float z_max = -1.0f; // max |dst|, found by the apply pass
                        if (s8)
                            batch_norm_add_relu_forward(d, in.x.data(), res_copy.data(),
                                                        in.gamma.data(), in.beta.data(), nullptr,
                                                        nullptr, dst, mask.data(), m.data(),
                                                        inv.data(), v.data(), centered.data(),
                                                        step.data(), threads, nullptr, &z_max);
                        else
                            batch_norm_add_relu_forward(
                                    d, in.x.data(), res_copy.data(), in.gamma.data(),
                                    in.beta.data(), in.running_mean.data(), in.running_var.data(),
                                    dst, mask.data(), m.data(), inv.data(), v.data(), threads);
                        const std::vector<float> got(dst, dst + n);
                        ASSERT_TRUE(same(got, want)) << threads << " threads: forward";
                        ASSERT_TRUE(same(m, mean) && same(inv, invstd));
                        if (s8) ASSERT_TRUE(centered == centered0 && same(step, step0));
                        if (s8)
                            ASSERT_EQ(z_max, channel_abs_max({1, 1, n}, want)[0])
                                    << threads << " threads: max |dst|";
                        for (int64_t i = 0; relu && i < n; ++i)
                            ASSERT_EQ(bit(mask, i), !(want[i] <= 0.0f)) << "i " << i;
                        // backward: the BatchNorm's own with this mask, and
                        // the residual's gradient the masked incoming one
                        std::vector<float> dx(n, 42.0f), dres(n, 42.0f), dg(c.channels),
                                db(c.channels), dx0(n, 7.0f), dg0(c.channels), db0(c.channels),
                                dmax(c.channels, -1.0f), dmax0(c.channels, -2.0f);
                        if (s8) {
                            batch_norm_add_relu_backward(
                                    d, in.dz.data(), mask.data(), centered.data(), step.data(),
                                    in.gamma.data(), inv.data(), dx.data(), dres.data(), dg.data(),
                                    db.data(), dmax.data(), threads);
                            batch_norm_relu_backward(d, in.dz.data(), mask.data(), centered.data(),
                                                     step.data(), in.gamma.data(), inv.data(),
                                                     dx0.data(), dg0.data(), db0.data(),
                                                     dmax0.data(), threads);
                            // max |dx| per channel, as found from what was written
                            for (int64_t ch = 0; ch < c.channels; ++ch) {
                                float want_max = 0.0f;
                                for (int64_t b = 0; b < c.batch; ++b)
                                    for (int64_t i = 0; i < c.spatial; ++i)
                                        want_max = std::max(
                                                want_max,
                                                std::fabs(
                                                        dx[(b * c.channels + ch) * c.spatial + i]));
                                ASSERT_EQ(dmax[ch], want_max) << "channel " << ch;
                                ASSERT_EQ(dmax0[ch], want_max) << "channel " << ch;
                            }
                        } else {
                            batch_norm_add_relu_backward(d, in.dz.data(), mask.data(), in.x.data(),
                                                         in.gamma.data(), m.data(), inv.data(),
                                                         dx.data(), dres.data(), dg.data(),
                                                         db.data(), threads);
                            batch_norm_relu_backward(d, in.dz.data(), mask.data(), in.x.data(),
                                                     in.gamma.data(), m.data(), inv.data(),
                                                     dx0.data(), dg0.data(), db0.data(), threads);
                        }
                        ASSERT_TRUE(same(dx, dx0) && same(dg, dg0) && same(db, db0))
                                << threads << " threads: backward";
                        for (int64_t i = 0; i < n; ++i)
                            ASSERT_EQ(dres[i], !relu || bit(mask, i) ? in.dz[i] : 0.0f)
                                    << "i " << i;
                        if (threads == 1) {
                            first_dx = dx, first_dres = dres;
                        } else {
                            ASSERT_TRUE(same(dx, first_dx) && same(dres, first_dres));
                        }
                        // only the residual's gradient wanted
                        std::vector<float> dres_only(n, 5.0f);
                        if (s8)
                            batch_norm_add_relu_backward(
                                    d, in.dz.data(), mask.data(), centered.data(), step.data(),
                                    in.gamma.data(), inv.data(), nullptr, dres_only.data(), nullptr,
                                    nullptr, nullptr, threads);
                        else
                            batch_norm_add_relu_backward(d, in.dz.data(), mask.data(), in.x.data(),
                                                         in.gamma.data(), m.data(), inv.data(),
                                                         nullptr, dres_only.data(), nullptr,
                                                         nullptr, threads);
                        ASSERT_TRUE(same(dres_only, dres));
                    }
                }
}

TEST(BatchNormRelu, a_residual_end_refuses_a_missing_residual) {
    batch_norm_relu_desc d;
    d.batch = 2, d.channels = 3, d.spatial = 5, d.relu = true;
    std::vector<float> x(30, 1.0f), z(30), m(3), inv(3), v(3);
    std::vector<uint8_t> mask(4);
    try {
        batch_norm_add_relu_forward(d, x.data(), nullptr, nullptr, nullptr, nullptr, nullptr,
                                    z.data(), mask.data(), m.data(), inv.data(), v.data());
        FAIL() << "a null residual was accepted";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find("residual"), std::string::npos) << e.what();
    }
}

} // namespace qsp::test
