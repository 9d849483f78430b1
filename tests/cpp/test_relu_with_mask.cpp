// ReLU with a one-bit mask (qsp::relu_with_mask_*): against a scalar model,
// over odd lengths (partial last byte, chunk edges), NaN / Inf / signed zeros,
// several thread counts, in place, and the argument checks.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "qsparseprop/qsparseprop.hpp"

namespace qsp::test {

namespace {

std::vector<float> inputs(int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    const float specials[] = {0.0f,
                              -0.0f,
                              std::numeric_limits<float>::quiet_NaN(),
                              -std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity(),
                              1e-45f,
                              -1e-45f};
    std::vector<float> x(n);
    for (int64_t i = 0; i < n; ++i)
        x[i] = rng() % 7 == 0 ? specials[rng() % 8] : normal(rng);
    return x;
}

// max(0, x) as MAXPS computes it: the second operand (x) when either is NaN
// or both are zeros — torch's vectorised clamp_min(x, 0).
float model_relu(float x) {
    return 0.0f > x ? 0.0f : (x > 0.0f ? x : (std::isnan(x) || x == 0.0f ? x : 0.0f));
}

bool same_bits(float a, float b) {
    return std::memcmp(&a, &b, sizeof a) == 0;
}

} // namespace

TEST(ReluWithMask, matches_the_scalar_model_over_odd_lengths_and_threads) {
    for (int64_t n : {1, 3, 7, 8, 9, 17, 63, 65, 8 * 4096 - 1, 8 * 4096, 8 * 4096 + 5, 100003}) {
        const auto x = inputs(n, static_cast<uint32_t>(n));
        for (int threads : {1, 2, 3}) {
            std::vector<float> y(n, 42.0f);
            std::vector<uint8_t> mask((n + 7) / 8, 0xAB);
            relu_with_mask_forward(x.data(), y.data(), mask.data(), n, threads);
            for (int64_t i = 0; i < n; ++i) {
                ASSERT_TRUE(same_bits(y[i], model_relu(x[i])))
                        << "n=" << n << " i=" << i << " x=" << x[i];
                ASSERT_EQ((mask[i / 8] >> (i % 8)) & 1, x[i] <= 0.0f ? 0 : 1)
                        << "n=" << n << " i=" << i;
            }
            for (int64_t i = n; i < static_cast<int64_t>(mask.size()) * 8; ++i)
                ASSERT_EQ((mask[i / 8] >> (i % 8)) & 1, 0) << "bits beyond n must be zero";

            const auto g = inputs(n, static_cast<uint32_t>(n) + 1); // NaN gradients included
            std::vector<float> dx(n, 42.0f);
            relu_with_mask_backward(g.data(), mask.data(), dx.data(), n, threads);
            for (int64_t i = 0; i < n; ++i)
                ASSERT_TRUE(same_bits(dx[i], x[i] <= 0.0f ? 0.0f : g[i]))
                        << "n=" << n << " i=" << i;
        }
    }
}

// With dst_abs_max: the same outputs and bits, and max |dst| (NaN where dst
// holds one; +Inf where an input is) as a pass over dst finds it.
TEST(ReluWithMask, gives_its_outputs_maximum) {
    for (int64_t n : {1, 7, 9, 65, 8 * 4096 + 5, 100003})
        for (bool with_nan : {false, true}) {
            auto x = inputs(n, static_cast<uint32_t>(n) + 7);
            for (float &v : x)
                if (!with_nan && std::isnan(v)) v = -1.0f;
            float want = 0.0f;
            bool nan = false;
            for (float v : x) {
                const float r = model_relu(v);
                nan = nan || std::isnan(r);
                if (std::fabs(r) > want) want = std::fabs(r);
            }
            for (int threads : {1, 3}) {
                std::vector<float> y(n, 42.0f), plain(n, 42.0f);
                std::vector<uint8_t> mask((n + 7) / 8, 0xAB), plain_mask(mask.size(), 0xCD);
                float got = -1.0f;
                relu_with_mask_forward(x.data(), y.data(), mask.data(), n, &got, threads);
                relu_with_mask_forward(x.data(), plain.data(), plain_mask.data(), n, threads);
                ASSERT_EQ(std::memcmp(y.data(), plain.data(), n * sizeof(float)), 0) << n;
                ASSERT_EQ(mask, plain_mask) << n;
                if (nan)
                    EXPECT_TRUE(std::isnan(got)) << "n=" << n;
                else
                    EXPECT_EQ(got, want) << "n=" << n << " threads=" << threads;
            }
        }
    float m = -1.0f;
    relu_with_mask_forward(nullptr, nullptr, nullptr, 0, &m);
    EXPECT_EQ(m, 0.0f);
}

TEST(ReluWithMask, runs_in_place) {
    const int64_t n = 1001;
    auto x = inputs(n, 5);
    const auto want = x;
    std::vector<uint8_t> mask((n + 7) / 8);
    relu_with_mask_forward(x.data(), x.data(), mask.data(), n);
    auto g = inputs(n, 6);
    const auto g0 = g;
    relu_with_mask_backward(g.data(), mask.data(), g.data(), n);
    for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(same_bits(x[i], model_relu(want[i])));
        ASSERT_TRUE(same_bits(g[i], want[i] <= 0.0f ? 0.0f : g0[i]));
    }
}

TEST(ReluWithMask, refuses_bad_arguments) {
    float f = 1.0f;
    uint8_t b = 0;
    EXPECT_THROW(relu_with_mask_forward(&f, &f, &b, -1), std::invalid_argument);
    EXPECT_THROW(relu_with_mask_forward(nullptr, &f, &b, 1), std::invalid_argument);
    EXPECT_THROW(relu_with_mask_backward(&f, nullptr, &f, 1), std::invalid_argument);
    EXPECT_NO_THROW(relu_with_mask_forward(nullptr, nullptr, nullptr, 0)); // nothing to do
    float *no_max = nullptr;
    EXPECT_THROW(relu_with_mask_forward(&f, &f, &b, 1, no_max), std::invalid_argument);
}

} // namespace qsp::test
