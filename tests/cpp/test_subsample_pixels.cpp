// The pixels of a strided 1x1 convolution (qsp::subsample_pixels_*):
// against index arithmetic over odd sizes and strides (1 included, and
// strides past the image), several thread counts, every element of the
// backward's output written, and the argument checks.
#include <cmath>
#include <random>
#include <stdexcept>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "qsparseprop/qsparseprop.hpp"

namespace qsp::test {

TEST(SubsamplePixels, forward_and_backward_match_the_index_model) {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal;
    for (auto [n, c, h, w] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 1},
                              {2, 3, 7, 5},
                              {3, 1, 17, 9},
                              {1, 5, 4, 63}})
        for (auto [sh, sw] : {std::pair<int64_t, int64_t>{1, 1}, {2, 2}, {3, 2}, {1, 3}, {8, 70}})
            for (int threads : {1, 2, 3}) {
                SCOPED_TRACE(std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(h)
                             + "x" + std::to_string(w) + " stride " + std::to_string(sh) + ","
                             + std::to_string(sw) + " threads " + std::to_string(threads));
                const int64_t oh = (h + sh - 1) / sh, ow = (w + sw - 1) / sw;
                std::vector<float> x(static_cast<size_t>(n * c * h * w));
                for (float &v : x)
                    v = normal(rng);
                std::vector<float> y(static_cast<size_t>(n * c * oh * ow), NAN);
                subsample_pixels_forward(x.data(), n, c, h, w, sh, sw, y.data(), threads);
                std::vector<float> g(y.size());
                for (float &v : g)
                    v = normal(rng);
                std::vector<float> dx(x.size(), NAN); // every element must be written
                subsample_pixels_backward(g.data(), n, c, h, w, sh, sw, dx.data(), threads);
                // the spread added into another gradient: x stands in for it
                std::vector<float> sum = x;
                subsample_pixels_backward_add(g.data(), n, c, h, w, sh, sw, sum.data(), threads);
                for (int64_t p = 0; p < n * c; ++p)
                    for (int64_t i = 0; i < h; ++i)
                        for (int64_t j = 0; j < w; ++j) {
                            const size_t at = static_cast<size_t>((p * h + i) * w + j);
                            const bool read = i % sh == 0 && j % sw == 0;
                            const size_t from =
                                    static_cast<size_t>((p * oh + i / sh) * ow + j / sw);
                            if (read) ASSERT_EQ(y[from], x[at]);
                            ASSERT_EQ(dx[at], read ? g[from] : 0.0f);
                            // bit for bit what a separate add would make
                            ASSERT_EQ(sum[at], read ? x[at] + g[from] : x[at]);
                        }
            }
}

TEST(SubsamplePixels, bad_arguments_are_named) {
    std::vector<float> a(16), b(16);
    EXPECT_THROW(subsample_pixels_forward(a.data(), 1, 1, 4, 4, 0, 1, b.data()),
                 std::invalid_argument);
    EXPECT_THROW(subsample_pixels_backward(a.data(), 1, 1, 0, 4, 1, 1, b.data()),
                 std::invalid_argument);
    EXPECT_THROW(subsample_pixels_forward(nullptr, 1, 1, 4, 4, 2, 2, b.data()),
                 std::invalid_argument);
    EXPECT_THROW(subsample_pixels_backward(a.data(), 1, 1, 4, 4, 2, 2, nullptr),
                 std::invalid_argument);
    EXPECT_THROW(subsample_pixels_backward_add(a.data(), 1, 1, 4, 4, 0, 2, b.data()),
                 std::invalid_argument);
    EXPECT_THROW(subsample_pixels_backward_add(nullptr, 1, 1, 4, 4, 2, 2, b.data()),
                 std::invalid_argument);
    try {
        subsample_pixels_forward(a.data(), -1, 1, 4, 4, 1, 1, b.data());
        FAIL() << "a negative batch was accepted";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find("batch"), std::string::npos) << e.what();
    }
    // nothing to do: no pointer is read
    subsample_pixels_forward(nullptr, 0, 3, 4, 4, 2, 2, nullptr);
    subsample_pixels_backward(nullptr, 2, 0, 4, 4, 2, 2, nullptr);
    subsample_pixels_backward_add(nullptr, 0, 3, 4, 4, 2, 2, nullptr);
}

} // namespace qsp::test
