#include "qsparseprop/primitives.hpp"

#include "primitives/passes/entry_arguments.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

// The pixels a strided 1x1 convolution without padding reads (every sh-th
// row, every sw-th column), and the spread of their gradient back over the
// whole image. Plain loops: both move memory and nothing else.
namespace qsp {

namespace {

struct subsample_shape {
    int64_t planes, h, w, sh, sw, oh, ow;
};

subsample_shape checked_shape(const char *what, int64_t batch, int64_t channels, int64_t h,
                              int64_t w, int64_t sh, int64_t sw) {
    if (batch < 0 || channels < 0 || h < 1 || w < 1)
        throw std::invalid_argument(std::string(what)
                                    + ": batch and channels must be >= 0 and h, w >= 1, got "
                                    + std::to_string(batch) + ", " + std::to_string(channels) + ", "
                                    + std::to_string(h) + ", " + std::to_string(w));
    if (sh < 1 || sw < 1)
        throw std::invalid_argument(std::string(what) + ": strides must be >= 1, got "
                                    + std::to_string(sh) + ", " + std::to_string(sw));
    return {batch * channels, h, w, sh, sw, (h + sh - 1) / sh, (w + sw - 1) / sw};
}

} // namespace

void subsample_pixels_forward(const float *src, int64_t batch, int64_t channels, int64_t h,
                              int64_t w, int64_t sh, int64_t sw, float *dst, int num_threads) {
    const subsample_shape s = checked_shape("subsample_pixels", batch, channels, h, w, sh, sw);
    if (s.planes == 0) return;
    detail::require_non_null(src, "subsample_pixels", "src");
    detail::require_non_null(dst, "subsample_pixels", "dst");
    const int threads = detail::threads_or_default(num_threads);
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t p = 0; p < s.planes; ++p)
        for (int64_t y = 0; y < s.oh; ++y) {
            const float *in = src + (p * s.h + y * s.sh) * s.w;
            float *out = dst + (p * s.oh + y) * s.ow;
            for (int64_t x = 0; x < s.ow; ++x)
                out[x] = in[x * s.sw];
        }
}

namespace {

// The backward's checks, shared by the spread and the spread added; the
// shape, or planes == 0 where there is nothing to do.
subsample_shape checked_gradient(const char *what, const float *diff_dst, int64_t batch,
                                 int64_t channels, int64_t h, int64_t w, int64_t sh, int64_t sw,
                                 const float *diff_src) {
    const subsample_shape s = checked_shape(what, batch, channels, h, w, sh, sw);
    if (s.planes == 0) return s;
    detail::require_non_null(diff_dst, what, "diff_dst");
    detail::require_non_null(diff_src, what, "diff_src");
    return s;
}

} // namespace

void subsample_pixels_backward(const float *diff_dst, int64_t batch, int64_t channels, int64_t h,
                               int64_t w, int64_t sh, int64_t sw, float *diff_src,
                               int num_threads) {
    const subsample_shape s = checked_gradient("subsample_pixels_backward", diff_dst, batch,
                                               channels, h, w, sh, sw, diff_src);
    if (s.planes == 0) return;
    // Each row of diff_src written once, zeros and values together (a zero
    // fill then a strided copy wrote the read rows twice).
    const int threads = detail::threads_or_default(num_threads);
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t p = 0; p < s.planes; ++p)
        for (int64_t y = 0; y < s.h; ++y) {
            float *out = diff_src + (p * s.h + y) * s.w;
            if (y % s.sh != 0) {
                std::fill(out, out + s.w, 0.f);
                continue;
            }
            const float *in = diff_dst + (p * s.oh + y / s.sh) * s.ow;
            if (s.sw == 1) {
                std::copy(in, in + s.w, out);
                continue;
            }
            std::fill(out, out + s.w, 0.f);
            for (int64_t x = 0; x < s.ow; ++x)
                out[x * s.sw] = in[x];
        }
}

void subsample_pixels_backward_add(const float *diff_dst, int64_t batch, int64_t channels,
                                   int64_t h, int64_t w, int64_t sh, int64_t sw, float *diff_src,
                                   int num_threads) {
    const subsample_shape s = checked_gradient("subsample_pixels_backward_add", diff_dst, batch,
                                               channels, h, w, sh, sw, diff_src);
    if (s.planes == 0) return;
    // only the rows the forward read: the others keep the gradient they hold
    const int threads = detail::threads_or_default(num_threads);
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t p = 0; p < s.planes; ++p)
        for (int64_t y = 0; y < s.oh; ++y) {
            const float *in = diff_dst + (p * s.oh + y) * s.ow;
            float *out = diff_src + (p * s.h + y * s.sh) * s.w;
            for (int64_t x = 0; x < s.ow; ++x)
                out[x * s.sw] += in[x];
        }
}

} // namespace qsp
