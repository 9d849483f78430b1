// The public ReLU-with-mask entry points: argument checks, thread count, then
// the pass.
#include <stdexcept>
#include <string>

#include <omp.h>

#include "primitives/passes/relu_mask.hpp"
#include "qsparseprop/primitives.hpp"

namespace qsp {

namespace {

void check(const void *a, const char *a_name, const void *b, const char *b_name, const void *c,
           const char *c_name, int64_t n) {
    if (n < 0)
        throw std::invalid_argument("relu_with_mask: n must be >= 0, got " + std::to_string(n));
    if (n == 0) return;
    for (auto [p, name] : {std::pair{a, a_name}, std::pair{b, b_name}, std::pair{c, c_name}})
        if (p == nullptr)
            throw std::invalid_argument(std::string("relu_with_mask: ") + name + " is null");
}

int threads_or_default(int num_threads) {
    return num_threads > 0 ? num_threads : omp_get_max_threads();
}

} // namespace

void relu_with_mask_forward(const float *src, float *dst, uint8_t *mask, int64_t n,
                            int num_threads) {
    check(src, "src", dst, "dst", mask, "mask", n);
    if (n > 0) detail::relu_mask_forward(src, dst, mask, n, threads_or_default(num_threads));
}

void relu_with_mask_backward(const float *diff_dst, const uint8_t *mask, float *diff_src, int64_t n,
                             int num_threads) {
    check(diff_dst, "diff_dst", mask, "mask", diff_src, "diff_src", n);
    if (n > 0)
        detail::relu_mask_backward(diff_dst, mask, diff_src, n, threads_or_default(num_threads));
}

} // namespace qsp
