// BatchNorm (+ ReLU) of the fused Conv2d block (qsp::batch_norm_relu_*):
// against a double-precision model of torch.nn.BatchNorm2d's arithmetic over
// odd shapes (planes of 1, 7, 63, 65 elements; planes and mask bytes that
// straddle the passes' chunks), batch and running statistics, with and
// without ReLU and affine parameters, 1-3 threads (results must not depend
// on them), in place, and the argument checks.
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "qsparseprop/qsparseprop.hpp"

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
}

} // namespace qsp::test
