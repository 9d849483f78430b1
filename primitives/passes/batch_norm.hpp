// BatchNorm over the NCHW output of a sparse layer, with the ReLU after it:
// the passes of the fused Conv2d-BatchNorm2d(-ReLU) block. Torch runs that
// chain as two statistics passes, an apply pass and a ReLU pass forward (and
// saves the ReLU's fp32 output), a ReLU pass and two BatchNorm passes
// backward; these make one statistics pass and one apply pass that also
// writes the ReLU's 1-bit mask forward, and two passes backward that read
// the mask in place of a masked gradient.
#pragma once

#include <cstdint>

namespace qsp::detail {

// N x C x S (S = H * W) contiguous: plane (n, c) starts at (n * C + c) * S.
struct channel_planes {
    int64_t batch = 0, channels = 0, spatial = 0;
    int64_t elements() const { return batch * channels * spatial; }
};

// Per channel, over the batch and the plane: the mean and the biased
// variance. Each plane is summed in float in two passes while it is in cache
// (its mean, then the squares about it), planes are combined in double
// (Chan et al.'s pairwise update): no cancellation of E[x^2] - E[x]^2, one
// pass over memory. A channel is reduced by one thread, in a fixed order:
// the results do not depend on the thread count.
void channel_statistics(const float *src, channel_planes shape, double *mean, double *var,
                        int num_threads);

// dst = src * scale[c] + shift[c]; with `bits`, dst = max(0, that) and
// bits = !(that <= 0), as relu_mask_forward (bits in the flat element order).
// dst may alias src.
void scale_shift_relu(const float *src, channel_planes shape, const float *scale,
                      const float *shift, float *dst, uint8_t *bits, int num_threads);

// Per channel, with g = diff_dst masked by `bits` (when given): sum(g) and
// sum(g * (src - mean[c])), in double over float plane partials.
void masked_gradient_sums(const float *diff_dst, const uint8_t *bits, const float *src,
                          channel_planes shape, const float *mean, double *sum_g,
                          double *sum_g_centered, int num_threads);

// diff_src = g * a[c] + (src - mean[c]) * b[c] + k[c], g as above. diff_src
// may alias diff_dst.
void masked_gradient_apply(const float *diff_dst, const uint8_t *bits, const float *src,
                           channel_planes shape, const float *mean, const float *a, const float *b,
                           const float *k, float *diff_src, int num_threads);

} // namespace qsp::detail
