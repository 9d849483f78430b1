// Portable reference kernels: the oracle of every test and the fallback on any
// CPU. Written to be obviously correct, with a fixed summation order per
// output element (so results do not depend on the thread count), and OpenMP
// over disjoint outputs only. Nothing here knows about dnnl or torch.
#pragma once

#include <cstdint>
#include <vector>

#include "qsparseprop/formats.hpp"
#include "qsparseprop/primitives.hpp"

namespace qsp::ref {

// ---- quantization (the s8 scheme of quantization.hpp) ---------------------

// max |x|, propagating NaN (any NaN gives NaN).
float abs_max(const float *x, int64_t n);
// Per-tensor round-to-nearest-even; returns the scale (0 for an all-zero
// tensor, NaN when x holds NaN/Inf: the s8 result is then NaN throughout).
float quantize_rne(const float *x, int64_t n, int8_t *q, int num_threads);
// Per-row symmetric weights: scale[r] = max_j |values in row r| / 127.
void quantize_weights(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                      int num_threads);
// Stochastic rounding of v[i] = x[i] * (multiplier ? multiplier[(i / inner) % channels] : 1)
// with noise stochastic_rounding_noise(seed32, i); returns the scale.
float quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
                          int64_t inner, uint32_t seed32, int8_t *q, int num_threads);

// ---- Linear: X B x K, W N x K (CSR), Y B x N ------------------------------

void linear_fwd_f32(const csr_pattern &p, const float *w, const float *src, const float *bias,
                    float *dst, int64_t batch, int num_threads);
void linear_bwd_data_f32(const csr_pattern &p, const float *w, const float *diff_dst,
                         float *diff_src, int64_t batch, int num_threads);
void linear_bwd_weights_f32(const csr_pattern &p, const float *src, const float *diff_dst,
                            float *diff_w, int64_t batch, int num_threads);
// db[n] = sum_b dY[b, n] (shared by both schemes; also the Conv2d one with inner > 1).
void bias_grad(const float *diff_dst, float *diff_bias, int64_t outer, int64_t channels,
               int64_t inner, int num_threads);

void linear_fwd_s8(const csr_pattern &p, const int8_t *wq, const float *w_scale,
                   const int8_t *src_q, float src_scale, const float *bias, float *dst,
                   int64_t batch, int num_threads);
void linear_bwd_data_s8(const csr_pattern &p, const int8_t *wq, const int8_t *diff_dst_q,
                        float diff_dst_scale, float *diff_src, int64_t batch, int num_threads);
void linear_bwd_weights_s8(const csr_pattern &p, const int8_t *src_q, float src_scale,
                           const int8_t *diff_dst_q, float diff_dst_scale, float *diff_w,
                           int64_t batch, int num_threads);

// ---- Conv2d: X N x C x H x W, W OC x (C/G * KH * KW) (CSR), Y N x OC x OH x OW

struct conv2d_shape {
    int64_t batch, in_c, in_h, in_w, out_c, out_h, out_w;
    conv2d_geometry g;
};

// Where the input gradient of one input channel comes from: the transposed
// pattern restricted to that channel's group (built once per primitive).
struct conv2d_transposed_pattern {
    // For input channel ic (within its group) and tap (kh, kw): entries
    // [ptr[t], ptr[t+1]) of (out channel, value index), t = (ic*KH+kh)*KW+kw,
    // over all output channels; the kernel keeps those of the right group.
    std::vector<int64_t> ptr;
    std::vector<int32_t> out_channel;
    std::vector<int64_t> value_index;
};
conv2d_transposed_pattern transpose_conv2d_pattern(const csr_pattern &p);

void conv2d_fwd_f32(const conv2d_shape &s, const csr_pattern &p, const float *w, const float *src,
                    const float *bias, float *dst, int num_threads);
void conv2d_bwd_data_f32(const conv2d_shape &s, const csr_pattern &p,
                         const conv2d_transposed_pattern &t, const float *w, const float *diff_dst,
                         float *diff_src, int num_threads);
void conv2d_bwd_weights_f32(const conv2d_shape &s, const csr_pattern &p, const float *src,
                            const float *diff_dst, float *diff_w, int num_threads);

void conv2d_fwd_s8(const conv2d_shape &s, const csr_pattern &p, const int8_t *wq,
                   const float *w_scale, const int8_t *src_q, float src_scale, const float *bias,
                   float *dst, int num_threads);
void conv2d_bwd_data_s8(const conv2d_shape &s, const csr_pattern &p,
                        const conv2d_transposed_pattern &t, const int8_t *wq,
                        const int8_t *diff_dst_q, float diff_dst_scale, float *diff_src,
                        int num_threads);
void conv2d_bwd_weights_s8(const conv2d_shape &s, const csr_pattern &p, const int8_t *src_q,
                           float src_scale, const int8_t *diff_dst_q, float diff_dst_scale,
                           float *diff_w, int num_threads);

} // namespace qsp::ref
