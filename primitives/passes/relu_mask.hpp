// ReLU whose backward needs one bit per element (where the input was > 0)
// instead of the fp32 output: the activation memory of int8 training, where
// the next sparse layer keeps only an int8 copy of its input.
#pragma once

#include <cstdint>

// SSE2 is part of x86-64 itself: no ISA target.
#include <emmintrin.h>

namespace qsp::detail {

// dst = relu(src) exactly as torch.relu (max(0, x): NaN and -0.0 pass
// through); bits[i / 8] bit (i % 8) = !(src[i] <= 0) (set for NaN, where torch
// passes the gradient); bits beyond n are zero.
// dst may alias src.
void relu_mask_forward(const float *src, float *dst, uint8_t *bits, int64_t n, int num_threads);
// The same, returning max |dst| (NaN where dst holds a NaN), found while
// each chunk is in cache.
float relu_mask_forward_max(const float *src, float *dst, uint8_t *bits, int64_t n,
                            int num_threads);
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

// Bit `bit` of the mask (element `bit`'s).
inline bool relu_mask_bit(const uint8_t *bits, int64_t bit) {
    return (bits[bit / 8] >> (bit % 8)) & 1;
}

// The mask bits of 8 elements from bit `bit` (any offset: a BatchNorm plane
// of 49 or 196 elements starts mid-byte) as two 4-lane selects, all-ones
// where set: and-ing a gradient with them is torch's ReLU backward (a
// select, so a NaN gradient where the input was <= 0 is dropped). Reads
// the byte after bit / 8 when the 8 bits straddle it (it holds elements of
// the 8, so it exists).
struct mask_lanes {
    __m128 lo, hi;
};
inline mask_lanes relu_mask_lanes(const uint8_t *bits, int64_t bit) {
    const int64_t at = bit / 8;
    const int shift = static_cast<int>(bit % 8);
    unsigned window = bits[at];
    if (shift != 0) window = (window | static_cast<unsigned>(bits[at + 1]) << 8) >> shift;
    const __m128i byte = _mm_set1_epi32(static_cast<int>(window & 0xffu));
    const __m128i lo_bits = _mm_set_epi32(8, 4, 2, 1), hi_bits = _mm_set_epi32(128, 64, 32, 16);
    return {_mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(byte, lo_bits), lo_bits)),
            _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(byte, hi_bits), hi_bits))};
}

} // namespace qsp::detail
