#include "primitives/ref/ref_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "primitives/core/s8_protocol.hpp"

namespace qsp::ref {

namespace s8 = detail::s8;

namespace {

// The f32 and s8 kernels differ only in element types and in how an
// accumulator becomes an output; one template per loop nest keeps them from
// drifting apart. s8 accumulates in int64: an exact integer sum whatever the
// reduction length (the int32-piecewise rule of quantization.hpp gives the
// same integers).
struct f32_types {
    using src_t = float;
    using w_t = float;
    using acc_t = float;
};
struct s8_types {
    using src_t = int8_t;
    using w_t = int8_t;
    using acc_t = int64_t;
};

} // namespace

// ---- Linear -----------------------------------------------------------------

namespace {

template <typename T, typename epilogue_fn>
void linear_fwd(const csr_pattern &p, const typename T::w_t *w, const typename T::src_t *src,
                const float *bias, float *dst, int64_t batch, int num_threads,
                epilogue_fn epilogue) {
    const int64_t K = p.cols(), N = p.rows();
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < batch; ++b) {
            typename T::acc_t acc = 0;
            for (int64_t i = rp[n]; i < rp[n + 1]; ++i)
                acc += static_cast<typename T::acc_t>(w[i])
                       * static_cast<typename T::acc_t>(src[b * K + ci[i]]);
            dst[b * N + n] = epilogue(acc, n) + (bias ? bias[n] : 0.f);
        }
}

template <typename T, typename epilogue_fn>
void linear_bwd_data(const csr_pattern &p, const typename T::w_t *w,
                     const typename T::src_t *diff_dst, float *diff_src, int64_t batch,
                     int num_threads, epilogue_fn epilogue) {
    const int64_t K = p.cols(), N = p.rows();
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    // Each thread owns whole rows of dX: no write ever collides.
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<typename T::acc_t> acc(static_cast<size_t>(K));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            std::fill(acc.begin(), acc.end(), typename T::acc_t(0));
            for (int64_t n = 0; n < N; ++n) {
                const auto g = static_cast<typename T::acc_t>(diff_dst[b * N + n]);
                for (int64_t i = rp[n]; i < rp[n + 1]; ++i)
                    acc[ci[i]] += static_cast<typename T::acc_t>(w[i]) * g;
            }
            for (int64_t k = 0; k < K; ++k)
                diff_src[b * K + k] = epilogue(acc[k]);
        }
    }
}

template <typename T, typename epilogue_fn>
void linear_bwd_weights(const csr_pattern &p, const typename T::src_t *src,
                        const typename T::src_t *diff_dst, float *diff_w, int64_t batch,
                        int num_threads, epilogue_fn epilogue) {
    const int64_t K = p.cols(), N = p.rows();
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t i = rp[n]; i < rp[n + 1]; ++i) {
            typename T::acc_t acc = 0;
            for (int64_t b = 0; b < batch; ++b)
                acc += static_cast<typename T::acc_t>(diff_dst[b * N + n])
                       * static_cast<typename T::acc_t>(src[b * K + ci[i]]);
            diff_w[i] = epilogue(acc);
        }
}

} // namespace

void linear_fwd_f32(const csr_pattern &p, const float *w, const float *src, const float *bias,
                    float *dst, int64_t batch, int num_threads) {
    linear_fwd<f32_types>(p, w, src, bias, dst, batch, num_threads,
                          [](float acc, int64_t) { return acc; });
}

void linear_bwd_data_f32(const csr_pattern &p, const float *w, const float *diff_dst,
                         float *diff_src, int64_t batch, int num_threads) {
    linear_bwd_data<f32_types>(p, w, diff_dst, diff_src, batch, num_threads,
                               [](float acc) { return acc; });
}

void linear_bwd_weights_f32(const csr_pattern &p, const float *src, const float *diff_dst,
                            float *diff_w, int64_t batch, int num_threads) {
    linear_bwd_weights<f32_types>(p, src, diff_dst, diff_w, batch, num_threads,
                                  [](float acc) { return acc; });
}

void linear_fwd_s8(const csr_pattern &p, const int8_t *wq, const float *w_scale,
                   const int8_t *src_q, float src_scale, const float *bias, float *dst,
                   int64_t batch, int num_threads) {
    linear_fwd<s8_types>(p, wq, src_q, bias, dst, batch, num_threads, [=](int64_t acc, int64_t n) {
        return static_cast<float>(acc) * s8::forward_scale(src_scale, w_scale[n]);
    });
}

void linear_bwd_data_s8(const csr_pattern &p, const int8_t *wq, const int8_t *diff_dst_q,
                        float diff_dst_scale, float *diff_src, int64_t batch, int num_threads) {
    linear_bwd_data<s8_types>(p, wq, diff_dst_q, diff_src, batch, num_threads, [=](int64_t acc) {
        return static_cast<float>(acc) * diff_dst_scale;
    });
}

void linear_bwd_weights_s8(const csr_pattern &p, const int8_t *src_q, float src_scale,
                           const int8_t *diff_dst_q, float diff_dst_scale, float *diff_w,
                           int64_t batch, int num_threads) {
    const float scale = s8::backward_weights_scale(diff_dst_scale, src_scale);
    linear_bwd_weights<s8_types>(p, src_q, diff_dst_q, diff_w, batch, num_threads,
                                 [=](int64_t acc) { return static_cast<float>(acc) * scale; });
}

// ---- Conv2d -----------------------------------------------------------------

namespace {

struct tap {
    int64_t ic, kh, kw;
};

inline tap decode(int64_t col, const conv2d_geometry &g) {
    return {col / (g.kernel_h * g.kernel_w), (col / g.kernel_w) % g.kernel_h, col % g.kernel_w};
}

inline int64_t group_of_out_channel(const conv2d_shape &s, int64_t oc) {
    return oc / (s.out_c / s.g.groups);
}

// Input coordinate hit by output coordinate o through tap k.
inline int64_t in_coord(int64_t o, int64_t k, int64_t stride, int64_t pad, int64_t dilation) {
    return o * stride - pad + k * dilation;
}

template <typename T, typename epilogue_fn>
void conv2d_fwd(const conv2d_shape &s, const csr_pattern &p, const typename T::w_t *w,
                const typename T::src_t *src, const float *bias, float *dst, int num_threads,
                epilogue_fn epilogue) {
    const auto &g = s.g;
    const int64_t icg = s.in_c / g.groups, out_plane = s.out_h * s.out_w;
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<typename T::acc_t> acc(static_cast<size_t>(out_plane));
#pragma omp for collapse(2) schedule(static)
        for (int64_t n = 0; n < s.batch; ++n)
            for (int64_t oc = 0; oc < s.out_c; ++oc) {
                std::fill(acc.begin(), acc.end(), typename T::acc_t(0));
                const int64_t ic0 = group_of_out_channel(s, oc) * icg;
                for (int64_t i = rp[oc]; i < rp[oc + 1]; ++i) {
                    const tap t = decode(ci[i], g);
                    const auto wv = static_cast<typename T::acc_t>(w[i]);
                    const auto *plane = src + (n * s.in_c + ic0 + t.ic) * s.in_h * s.in_w;
                    for (int64_t oh = 0; oh < s.out_h; ++oh) {
                        const int64_t ih = in_coord(oh, t.kh, g.stride_h, g.pad_top, g.dilation_h);
                        if (ih < 0 || ih >= s.in_h) continue;
                        for (int64_t ow = 0; ow < s.out_w; ++ow) {
                            const int64_t iw =
                                    in_coord(ow, t.kw, g.stride_w, g.pad_left, g.dilation_w);
                            if (iw < 0 || iw >= s.in_w) continue;
                            acc[oh * s.out_w + ow] +=
                                    wv * static_cast<typename T::acc_t>(plane[ih * s.in_w + iw]);
                        }
                    }
                }
                float *out = dst + (n * s.out_c + oc) * out_plane;
                const float b = bias ? bias[oc] : 0.f;
                for (int64_t o = 0; o < out_plane; ++o)
                    out[o] = epilogue(acc[o], oc) + b;
            }
    }
}

template <typename T, typename epilogue_fn>
void conv2d_bwd_data(const conv2d_shape &s, const conv2d_transposed_pattern &t,
                     const typename T::w_t *w, const typename T::src_t *diff_dst, float *diff_src,
                     int num_threads, epilogue_fn epilogue) {
    const auto &g = s.g;
    const int64_t icg = s.in_c / g.groups, ocg = s.out_c / g.groups;
    const int64_t in_plane = s.in_h * s.in_w, out_plane = s.out_h * s.out_w;
    // Each (image, input channel) plane of dX belongs to one thread.
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<typename T::acc_t> acc(static_cast<size_t>(in_plane));
#pragma omp for collapse(2) schedule(static)
        for (int64_t n = 0; n < s.batch; ++n)
            for (int64_t ic = 0; ic < s.in_c; ++ic) {
                std::fill(acc.begin(), acc.end(), typename T::acc_t(0));
                const int64_t grp = ic / icg, oc_lo = grp * ocg, oc_hi = oc_lo + ocg;
                for (int64_t kh = 0; kh < g.kernel_h; ++kh)
                    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                        const int64_t col = ((ic % icg) * g.kernel_h + kh) * g.kernel_w + kw;
                        for (int64_t e = t.ptr[col]; e < t.ptr[col + 1]; ++e) {
                            const int64_t oc = t.out_channel[e];
                            if (oc < oc_lo || oc >= oc_hi) continue;
                            const auto wv = static_cast<typename T::acc_t>(w[t.value_index[e]]);
                            const auto *dplane = diff_dst + (n * s.out_c + oc) * out_plane;
                            for (int64_t oh = 0; oh < s.out_h; ++oh) {
                                const int64_t ih =
                                        in_coord(oh, kh, g.stride_h, g.pad_top, g.dilation_h);
                                if (ih < 0 || ih >= s.in_h) continue;
                                for (int64_t ow = 0; ow < s.out_w; ++ow) {
                                    const int64_t iw =
                                            in_coord(ow, kw, g.stride_w, g.pad_left, g.dilation_w);
                                    if (iw < 0 || iw >= s.in_w) continue;
                                    acc[ih * s.in_w + iw] += wv
                                                             * static_cast<typename T::acc_t>(
                                                                     dplane[oh * s.out_w + ow]);
                                }
                            }
                        }
                    }
                float *out = diff_src + (n * s.in_c + ic) * in_plane;
                for (int64_t i = 0; i < in_plane; ++i)
                    out[i] = epilogue(acc[i]);
            }
    }
}

template <typename T, typename epilogue_fn>
void conv2d_bwd_weights(const conv2d_shape &s, const csr_pattern &p, const typename T::src_t *src,
                        const typename T::src_t *diff_dst, float *diff_w, int num_threads,
                        epilogue_fn epilogue) {
    const auto &g = s.g;
    const int64_t icg = s.in_c / g.groups, out_plane = s.out_h * s.out_w;
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t oc = 0; oc < s.out_c; ++oc) {
        const int64_t ic0 = group_of_out_channel(s, oc) * icg;
        for (int64_t i = rp[oc]; i < rp[oc + 1]; ++i) {
            const tap t = decode(ci[i], g);
            typename T::acc_t acc = 0;
            for (int64_t n = 0; n < s.batch; ++n) {
                const auto *plane = src + (n * s.in_c + ic0 + t.ic) * s.in_h * s.in_w;
                const auto *dplane = diff_dst + (n * s.out_c + oc) * out_plane;
                for (int64_t oh = 0; oh < s.out_h; ++oh) {
                    const int64_t ih = in_coord(oh, t.kh, g.stride_h, g.pad_top, g.dilation_h);
                    if (ih < 0 || ih >= s.in_h) continue;
                    for (int64_t ow = 0; ow < s.out_w; ++ow) {
                        const int64_t iw = in_coord(ow, t.kw, g.stride_w, g.pad_left, g.dilation_w);
                        if (iw < 0 || iw >= s.in_w) continue;
                        acc += static_cast<typename T::acc_t>(dplane[oh * s.out_w + ow])
                               * static_cast<typename T::acc_t>(plane[ih * s.in_w + iw]);
                    }
                }
            }
            diff_w[i] = epilogue(acc);
        }
    }
}

} // namespace

conv2d_transposed_pattern transpose_conv2d_pattern(const csr_pattern &p) {
    conv2d_transposed_pattern t;
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    t.ptr.assign(static_cast<size_t>(p.cols()) + 1, 0);
    for (int64_t i = 0; i < p.nnz(); ++i)
        ++t.ptr[ci[i] + 1];
    for (int64_t c = 0; c < p.cols(); ++c)
        t.ptr[c + 1] += t.ptr[c];
    t.out_channel.resize(static_cast<size_t>(p.nnz()));
    t.value_index.resize(static_cast<size_t>(p.nnz()));
    std::vector<int64_t> next(t.ptr.begin(), t.ptr.end() - 1);
    for (int64_t r = 0; r < p.rows(); ++r) // rows ascending: entries sorted by oc
        for (int64_t i = rp[r]; i < rp[r + 1]; ++i) {
            const int64_t slot = next[ci[i]]++;
            t.out_channel[slot] = static_cast<int32_t>(r);
            t.value_index[slot] = i;
        }
    return t;
}

void conv2d_fwd_f32(const conv2d_shape &s, const csr_pattern &p, const float *w, const float *src,
                    const float *bias, float *dst, int num_threads) {
    conv2d_fwd<f32_types>(s, p, w, src, bias, dst, num_threads,
                          [](float acc, int64_t) { return acc; });
}

void conv2d_bwd_data_f32(const conv2d_shape &s, const csr_pattern &,
                         const conv2d_transposed_pattern &t, const float *w, const float *diff_dst,
                         float *diff_src, int num_threads) {
    conv2d_bwd_data<f32_types>(s, t, w, diff_dst, diff_src, num_threads,
                               [](float acc) { return acc; });
}

void conv2d_bwd_weights_f32(const conv2d_shape &s, const csr_pattern &p, const float *src,
                            const float *diff_dst, float *diff_w, int num_threads) {
    conv2d_bwd_weights<f32_types>(s, p, src, diff_dst, diff_w, num_threads,
                                  [](float acc) { return acc; });
}

void conv2d_fwd_s8(const conv2d_shape &s, const csr_pattern &p, const int8_t *wq,
                   const float *w_scale, const int8_t *src_q, float src_scale, const float *bias,
                   float *dst, int num_threads) {
    conv2d_fwd<s8_types>(s, p, wq, src_q, bias, dst, num_threads, [=](int64_t acc, int64_t oc) {
        return static_cast<float>(acc) * s8::forward_scale(src_scale, w_scale[oc]);
    });
}

void conv2d_bwd_data_s8(const conv2d_shape &s, const csr_pattern &,
                        const conv2d_transposed_pattern &t, const int8_t *wq,
                        const int8_t *diff_dst_q, float diff_dst_scale, float *diff_src,
                        int num_threads) {
    conv2d_bwd_data<s8_types>(s, t, wq, diff_dst_q, diff_src, num_threads, [=](int64_t acc) {
        return static_cast<float>(acc) * diff_dst_scale;
    });
}

void conv2d_bwd_weights_s8(const conv2d_shape &s, const csr_pattern &p, const int8_t *src_q,
                           float src_scale, const int8_t *diff_dst_q, float diff_dst_scale,
                           float *diff_w, int num_threads) {
    const float scale = s8::backward_weights_scale(diff_dst_scale, src_scale);
    conv2d_bwd_weights<s8_types>(s, p, src_q, diff_dst_q, diff_w, num_threads,
                                 [=](int64_t acc) { return static_cast<float>(acc) * scale; });
}

} // namespace qsp::ref
