#include "primitives/passes/relu_mask.hpp"

#include "primitives/passes/entry_arguments.hpp"

#include "qsparseprop/primitives.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include <omp.h>

// SSE2 is part of x86-64 itself: this file needs no ISA target and runs on
// every CPU the library does. The work is memory bound; wider vectors would
// not make it faster.
#include <emmintrin.h>

namespace qsp::detail {

namespace {

// Whole bytes (8 elements) per OpenMP chunk, so no two threads write one byte.
constexpr int64_t chunk_elems = 8 * 4096;

int64_t chunks_of(int64_t n) {
    return (n + chunk_elems - 1) / chunk_elems;
}

} // namespace

namespace {

// The output's running maximum (relu's output is >= 0, -0.0 or NaN; max_ps
// keeps the non-NaN operand, so NaN is tracked on its own).
struct running_max {
    __m128 top = _mm_setzero_ps(), unordered = _mm_setzero_ps();
    void add(__m128 v) {
        top = _mm_max_ps(top, v);
        unordered = _mm_or_ps(unordered, _mm_cmpunord_ps(v, v));
    }
};

// relu_mask_range, taking the maximum of what it writes when `max` is given
// (in registers: the output is not read again).
template <bool with_max>
void relu_range(const float *src, float *dst, uint8_t *bits, int64_t begin, int64_t end,
                running_max *max) {
    const __m128 zero = _mm_setzero_ps();
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m128 a = _mm_loadu_ps(src + i), b = _mm_loadu_ps(src + i + 4);
        // The bit is !(x <= 0) (cmpnle: true for NaN), the condition under
        // which torch's ReLU backward passes the gradient; max_ps returns
        // its second operand when either is NaN or both are zeros, as
        // torch's vectorised clamp_min.
        const int lo = _mm_movemask_ps(_mm_cmpnle_ps(a, zero));
        const int hi = _mm_movemask_ps(_mm_cmpnle_ps(b, zero));
        const __m128 ra = _mm_max_ps(zero, a), rb = _mm_max_ps(zero, b);
        _mm_storeu_ps(dst + i, ra);
        _mm_storeu_ps(dst + i + 4, rb);
        bits[i / 8] = static_cast<uint8_t>(lo | (hi << 4));
        if constexpr (with_max) {
            max->add(ra);
            max->add(rb);
        }
    }
    if (i < end) { // the last, partial byte
        uint8_t byte = 0;
        for (int64_t j = i; j < end; ++j) {
            const __m128 v = _mm_set_ss(src[j]);
            byte |= static_cast<uint8_t>((_mm_movemask_ps(_mm_cmpnle_ss(v, zero)) & 1) << (j - i));
            const __m128 r = _mm_max_ss(zero, v);
            dst[j] = _mm_cvtss_f32(r);
            if constexpr (with_max) max->add(_mm_shuffle_ps(r, r, 0)); // all lanes the element
        }
        bits[i / 8] = byte;
    }
}

} // namespace

void relu_mask_range(const float *src, float *dst, uint8_t *bits, int64_t begin, int64_t end) {
    relu_range<false>(src, dst, bits, begin, end, nullptr);
}

void relu_mask_forward(const float *src, float *dst, uint8_t *bits, int64_t n, int num_threads) {
    const int64_t chunks = chunks_of(n);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < chunks; ++c)
        relu_mask_range(src, dst, bits, c * chunk_elems,
                        std::min<int64_t>(n, (c + 1) * chunk_elems));
}

float relu_mask_forward_max(const float *src, float *dst, uint8_t *bits, int64_t n,
                            int num_threads) {
    const int64_t chunks = chunks_of(n);
    float best = 0.0f;
    bool nan = false;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(max                   \
                                                                             : best)               \
        reduction(||                                                                               \
                  : nan)
    for (int64_t c = 0; c < chunks; ++c) {
        running_max m;
        relu_range<true>(src, dst, bits, c * chunk_elems,
                         std::min<int64_t>(n, (c + 1) * chunk_elems), &m);
        alignas(16) float lanes[4];
        _mm_store_ps(lanes, m.top);
        best = std::max(best, std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3])));
        nan = nan || _mm_movemask_ps(m.unordered) != 0;
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

void relu_mask_backward_range(const float *diff_dst, const uint8_t *bits, int64_t first_bit,
                              float *diff_src, int64_t n) {
    int64_t j = 0;
    const auto scalar = [&](int64_t at) {
        diff_src[at] = relu_mask_bit(bits, first_bit + at) ? diff_dst[at] : 0.0f;
    };
    for (; j + 8 <= n; j += 8) {
        const mask_lanes m = relu_mask_lanes(bits, first_bit + j);
        _mm_storeu_ps(diff_src + j, _mm_and_ps(m.lo, _mm_loadu_ps(diff_dst + j)));
        _mm_storeu_ps(diff_src + j + 4, _mm_and_ps(m.hi, _mm_loadu_ps(diff_dst + j + 4)));
    }
    for (; j < n; ++j)
        scalar(j);
}

void relu_mask_backward(const float *diff_dst, const uint8_t *bits, float *diff_src, int64_t n,
                        int num_threads) {
    const int64_t chunks = chunks_of(n);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t begin = c * chunk_elems, end = std::min<int64_t>(n, begin + chunk_elems);
        relu_mask_backward_range(diff_dst + begin, bits, begin, diff_src + begin, end - begin);
    }
}

} // namespace qsp::detail

// The public entry points (qsparseprop/primitives.hpp): argument checks,
// thread count, then the pass.
namespace qsp {

namespace {

void check(const void *a, const char *a_name, const void *b, const char *b_name, const void *c,
           const char *c_name, int64_t n) {
    if (n < 0)
        throw std::invalid_argument("relu_with_mask: n must be >= 0, got " + std::to_string(n));
    if (n == 0) return;
    for (auto [p, name] : {std::pair{a, a_name}, std::pair{b, b_name}, std::pair{c, c_name}})
        detail::require_non_null(p, "relu_with_mask", name);
}

} // namespace

void relu_with_mask_forward(const float *src, float *dst, uint8_t *mask, int64_t n,
                            int num_threads) {
    check(src, "src", dst, "dst", mask, "mask", n);
    if (n > 0)
        detail::relu_mask_forward(src, dst, mask, n, detail::threads_or_default(num_threads));
}

void relu_with_mask_forward(const float *src, float *dst, uint8_t *mask, int64_t n,
                            float *dst_abs_max, int num_threads) {
    check(src, "src", dst, "dst", mask, "mask", n);
    detail::require_non_null(dst_abs_max, "relu_with_mask", "dst_abs_max");
    *dst_abs_max = n > 0 ? detail::relu_mask_forward_max(src, dst, mask, n,
                                                         detail::threads_or_default(num_threads))
                         : 0.0f;
}

void relu_with_mask_backward(const float *diff_dst, const uint8_t *mask, float *diff_src, int64_t n,
                             int num_threads) {
    check(diff_dst, "diff_dst", mask, "mask", diff_src, "diff_src", n);
    if (n > 0)
        detail::relu_mask_backward(diff_dst, mask, diff_src, n,
                                   detail::threads_or_default(num_threads));
}

} // namespace qsp
