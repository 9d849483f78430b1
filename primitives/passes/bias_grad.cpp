#include "primitives/passes/bias_grad.hpp"

#include <algorithm>

#include "jit/tile_abi.hpp"

namespace qsp::detail {

void bias_grad(const float *diff_dst, float *diff_bias, int64_t outer, int64_t channels,
               int64_t inner, int num_threads) {
    if (inner == 1) {
        // Row-major [outer x channels]: sum whole rows into a block of
        // channels, a vector of channels at a time (each channel still adds
        // in outer order); blocks of 64 give 2-3 threads work at 768
        // channels, where 256 left one thread a third of them.
        constexpr int64_t block = 64;
        const int64_t blocks = (channels + block - 1) / block;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t cb = 0; cb < blocks; ++cb) {
            const int64_t c0 = cb * block, c1 = std::min(channels, c0 + block);
            float acc[block] = {};
            for (int64_t o = 0; o < outer; ++o) {
                const float *row = diff_dst + o * channels + c0;
#pragma omp simd
                for (int64_t c = 0; c < c1 - c0; ++c)
                    acc[c] += row[c];
            }
            for (int64_t c = c0; c < c1; ++c)
                diff_bias[c] = acc[c - c0];
        }
        return;
    }
    // 16 independent partial sums per channel (one vector of them: a single
    // running sum is bound by the add latency), combined in a fixed order:
    // the result does not depend on the thread count.
    constexpr int64_t lanes = 16;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < channels; ++c) {
        float part[lanes] = {};
        for (int64_t o = 0; o < outer; ++o) {
            const float *p = diff_dst + (o * channels + c) * inner;
            int64_t i = 0;
            for (; i + lanes <= inner; i += lanes)
                for (int64_t l = 0; l < lanes; ++l)
                    part[l] += p[i + l];
            for (; i < inner; ++i)
                part[i % lanes] += p[i];
        }
        float acc = 0.f;
        for (int64_t l = 0; l < lanes; ++l)
            acc += part[l];
        diff_bias[c] = acc;
    }
}

void bias_grad_kept(const float *diff_dst, float *diff_bias, int64_t batch, int64_t channels,
                    int num_threads) {
    constexpr int64_t tb = jit::tile_batch, block = 8; // 8 channels' sums side by side
    const int64_t tiles = jit::tile_count(batch), blocks = (channels + block - 1) / block;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t c0 = cb * block, cn = std::min(block, channels - c0);
        float acc[block] = {};
        for (int64_t t = 0; t < tiles; ++t) {
            const float *rows = diff_dst + (t * channels + c0) * tb;
            const int64_t lanes = std::min(tb, batch - t * tb);
            for (int64_t j = 0; j < lanes; ++j)
                for (int64_t k = 0; k < cn; ++k)
                    acc[k] += rows[k * tb + j];
        }
        for (int64_t k = 0; k < cn; ++k)
            diff_bias[c0 + k] = acc[k];
    }
}

} // namespace qsp::detail
