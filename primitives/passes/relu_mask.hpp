// ReLU whose backward needs one bit per element (where the input was > 0)
// instead of the fp32 output: the activation memory of int8 training, where
// the next sparse layer keeps only an int8 copy of its input.
#pragma once

#include <cstdint>

namespace qsp::detail {

// dst = relu(src) exactly as torch.relu (max(0, x): NaN and -0.0 pass
// through); bits[i / 8] bit (i % 8) = !(src[i] <= 0) (set for NaN, where torch
// passes the gradient); bits beyond n are zero.
// dst may alias src.
void relu_mask_forward(const float *src, float *dst, uint8_t *bits, int64_t n, int num_threads);
// The same over elements [begin, end) on the calling thread: begin must be a
// multiple of 8, and bits beyond `end` in its last byte are zeroed (so `end`
// must be n or a multiple of 8).
void relu_mask_range(const float *src, float *dst, uint8_t *bits, int64_t begin, int64_t end);
// diff_src = bit ? diff_dst : 0 (torch's threshold_backward: a NaN gradient
// where the input was <= 0 becomes 0). diff_src may alias diff_dst.
void relu_mask_backward(const float *diff_dst, const uint8_t *bits, float *diff_src, int64_t n,
                        int num_threads);
// The same on the calling thread for n elements whose bits start at bit
// `first_bit` of `bits` (diff_dst and diff_src point at the first element).
void relu_mask_backward_range(const float *diff_dst, const uint8_t *bits, int64_t first_bit,
                              float *diff_src, int64_t n);

} // namespace qsp::detail
