#include "primitives/passes/post_ops.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/relu_mask.hpp"

// Portable C++ (the compiler's baseline vectors): memory-bound passes that
// run on every CPU the library does.
namespace qsp::detail {

namespace {

constexpr int64_t chunk_elems = 8 * 4096; // whole mask bytes per chunk: no shared byte

float relu(float x) {
    return 0.0f > x ? 0.0f : x; // NaN and -0.0 pass, as torch.relu
}

float gelu_tanh(float x) {
    constexpr float k = 0.7978845608028654f; // sqrt(2 / pi)
    return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

float gelu_erf(float x) {
    return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
}

bool elementwise(post_ops::kind k) {
    return k != post_ops::kind::batch_statistics;
}

// One elementwise post-op over dst[begin, end).
void apply_range(post_ops::kind k, const post_op_tensors &t, float *dst, int64_t begin,
                 int64_t end) {
    switch (k) {
        case post_ops::kind::relu:
            if (t.mask) {
                relu_mask_range(dst, dst, t.mask, begin, end);
            } else {
#pragma omp simd
                for (int64_t i = begin; i < end; ++i)
                    dst[i] = relu(dst[i]);
            }
            break;
        case post_ops::kind::gelu_tanh:
            for (int64_t i = begin; i < end; ++i)
                dst[i] = gelu_tanh(dst[i]);
            break;
        case post_ops::kind::gelu_erf:
            for (int64_t i = begin; i < end; ++i)
                dst[i] = gelu_erf(dst[i]);
            break;
        case post_ops::kind::add:
#pragma omp simd
            for (int64_t i = begin; i < end; ++i)
                dst[i] += t.src[i];
            break;
        case post_ops::kind::batch_statistics:
            break;
    }
}

// Per column of a rows x cols matrix: blocks of rows summed in float across
// the columns (vectorised), combined in double in a fixed order (Chan et
// al.), columns split between threads: thread-count independent.
void column_statistics(const float *x, int64_t rows, int64_t cols, float *mean, float *var,
                       int num_threads) {
    constexpr int64_t block_rows = 64, block_cols = 256;
    const int64_t col_blocks = (cols + block_cols - 1) / block_cols;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t cb = 0; cb < col_blocks; ++cb) {
        const int64_t c0 = cb * block_cols, c1 = std::min(cols, c0 + block_cols), w = c1 - c0;
        double count[block_cols] = {}, m[block_cols] = {}, m2[block_cols] = {};
        float sum[block_cols], centre[block_cols], squares[block_cols];
        for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
            const int64_t r1 = std::min(rows, r0 + block_rows);
            const double n = static_cast<double>(r1 - r0);
            std::fill(sum, sum + w, 0.0f);
            for (int64_t r = r0; r < r1; ++r) {
                const float *row = x + r * cols + c0;
#pragma omp simd
                for (int64_t c = 0; c < w; ++c)
                    sum[c] += row[c];
            }
            for (int64_t c = 0; c < w; ++c)
                centre[c] = static_cast<float>(sum[c] / n);
            std::fill(squares, squares + w, 0.0f);
            for (int64_t r = r0; r < r1; ++r) {
                const float *row = x + r * cols + c0;
#pragma omp simd
                for (int64_t c = 0; c < w; ++c)
                    squares[c] += (row[c] - centre[c]) * (row[c] - centre[c]);
            }
            for (int64_t c = 0; c < w; ++c) {
                const double block_mean = static_cast<double>(sum[c]) / n;
                const double off = block_mean - centre[c];
                const double block_m2 = std::max(0.0, squares[c] - n * off * off);
                const double total = count[c] + n, delta = block_mean - m[c];
                m[c] += delta * n / total;
                m2[c] += block_m2 + delta * delta * count[c] * n / total;
                count[c] = total;
            }
        }
        for (int64_t c = 0; c < w; ++c) {
            mean[c0 + c] = static_cast<float>(m[c]);
            var[c0 + c] = static_cast<float>(count[c] > 0 ? m2[c] / count[c] : 0.0);
        }
    }
}

// Each channel's lowest and highest value (NaN compares false: skipped).
void channel_ranges(const float *dst, channel_layout l, float *range, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < l.channels; ++c) {
        float lowest = std::numeric_limits<float>::infinity(), highest = -lowest;
        for (int64_t o = 0; o < l.outer; ++o) {
            const float *run = dst + (o * l.channels + c) * l.inner;
            for (int64_t j = 0; j < l.inner; ++j) {
                lowest = run[j] < lowest ? run[j] : lowest;
                highest = run[j] > highest ? run[j] : highest;
            }
        }
        range[2 * c] = lowest;
        range[2 * c + 1] = highest;
    }
}

void batch_statistics(const float *dst, channel_layout l, const post_op_tensors &t,
                      int num_threads) {
    if (l.inner == 1) {
        column_statistics(dst, l.outer, l.channels, t.mean, t.variance, num_threads);
        if (t.range) channel_ranges(dst, l, t.range, num_threads);
        return;
    }
    std::vector<double> m(static_cast<size_t>(l.channels)), v(m.size());
    std::vector<channel_range> r(t.range ? m.size() : 0);
    channel_statistics(dst, {l.outer, l.channels, l.inner}, m.data(), v.data(),
                       t.range ? r.data() : nullptr, num_threads);
    for (size_t c = 0; c < m.size(); ++c) {
        t.mean[c] = static_cast<float>(m[c]);
        t.variance[c] = static_cast<float>(v[c]);
        if (t.range) {
            t.range[2 * c] = r[c].lowest;
            t.range[2 * c + 1] = r[c].highest;
        }
    }
}

} // namespace

void apply_post_ops(const std::vector<post_ops::kind> &chain,
                    const std::vector<post_op_tensors> &tensors, float *dst, channel_layout layout,
                    int num_threads, size_t first) {
    const int64_t n = layout.elements();
    if (n == 0) return;
    while (first < chain.size()) {
        if (!elementwise(chain[first])) {
            batch_statistics(dst, layout, tensors[first], num_threads);
            ++first;
            continue;
        }
        size_t last = first; // the run of elementwise post-ops [first, last)
        while (last < chain.size() && elementwise(chain[last]))
            ++last;
        const int64_t chunks = (n + chunk_elems - 1) / chunk_elems;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t begin = c * chunk_elems, end = std::min(n, begin + chunk_elems);
            for (size_t k = first; k < last; ++k)
                apply_range(chain[k], tensors[k], dst, begin, end);
        }
        first = last;
    }
}

void apply_post_ops_reference(const std::vector<post_ops::kind> &chain,
                              const std::vector<post_op_tensors> &tensors, float *dst,
                              channel_layout l) {
    const int64_t n = l.elements();
    for (size_t k = 0; k < chain.size(); ++k) {
        const post_op_tensors &t = tensors[k];
        switch (chain[k]) {
            case post_ops::kind::relu:
                for (int64_t i = 0; i < n; ++i) {
                    if (t.mask && i % 8 == 0) t.mask[i / 8] = 0;
                    if (t.mask && !(dst[i] <= 0.0f))
                        t.mask[i / 8] = static_cast<uint8_t>(t.mask[i / 8] | (1u << (i % 8)));
                    dst[i] = relu(dst[i]);
                }
                break;
            case post_ops::kind::gelu_tanh:
            case post_ops::kind::gelu_erf:
                for (int64_t i = 0; i < n; ++i) {
                    const double x = dst[i];
                    const double y =
                            chain[k] == post_ops::kind::gelu_erf
                                    ? 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)))
                                    : 0.5 * x
                                              * (1.0
                                                 + std::tanh(std::sqrt(2.0 / M_PI)
                                                             * (x + 0.044715 * x * x * x)));
                    dst[i] = static_cast<float>(y);
                }
                break;
            case post_ops::kind::add:
                for (int64_t i = 0; i < n; ++i)
                    dst[i] += t.src[i];
                break;
            case post_ops::kind::batch_statistics:
                for (int64_t c = 0; c < l.channels; ++c) {
                    double sum = 0, squares = 0;
                    const double count = static_cast<double>(l.outer * l.inner);
                    for (int64_t o = 0; o < l.outer; ++o)
                        for (int64_t j = 0; j < l.inner; ++j)
                            sum += dst[(o * l.channels + c) * l.inner + j];
                    const double mean = sum / count;
                    // the range apart from the passes' channel_ranges: the
                    // oracle shares no code with what it checks
                    float lowest = std::numeric_limits<float>::infinity(), highest = -lowest;
                    for (int64_t o = 0; o < l.outer; ++o)
                        for (int64_t j = 0; j < l.inner; ++j) {
                            const float v = dst[(o * l.channels + c) * l.inner + j];
                            const double d = v - mean;
                            squares += d * d;
                            lowest = std::min(lowest, v), highest = std::max(highest, v);
                        }
                    t.mean[c] = static_cast<float>(mean);
                    t.variance[c] = static_cast<float>(squares / count);
                    if (t.range) {
                        t.range[2 * c] = lowest;
                        t.range[2 * c + 1] = highest;
                    }
                }
                break;
        }
    }
}

} // namespace qsp::detail
