// The bias gradient, shared by every implementation of both schemes (fp32
// sums: cheap, and exact enough for a bias).
#pragma once

#include <cstdint>

namespace qsp::detail {

// diff_bias[c] = sum over o, i of diff_dst[(o * channels + c) * inner + i]
// (Linear: inner = 1; Conv2d: inner = OH * OW), each channel summed in a
// fixed order so the result does not depend on the thread count.
void bias_grad(const float *diff_dst, float *diff_bias, int64_t outer, int64_t channels,
               int64_t inner, int num_threads);

// Linear's (inner 1) from diff_dst in the kept layout (kept_layout_desc:
// tiles [tiles][channels][64]): each channel summed in batch order, the
// same float additions as bias_grad's, so the same bits.
void bias_grad_kept(const float *diff_dst, float *diff_bias, int64_t batch, int64_t channels,
                    int num_threads);

} // namespace qsp::detail
