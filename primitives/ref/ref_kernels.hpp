// Portable reference kernels: the oracle of every test and the fallback on any
// CPU. Written to be obviously correct, with a fixed summation order per
// output element (so results do not depend on the thread count), and OpenMP
// over disjoint outputs only. The s8 quantization itself is the portable
// tier of primitives/passes/quantize.hpp. Nothing here knows dnnl or torch.
#pragma once

#include <cstdint>
#include <vector>

#include "primitives/core/problem.hpp"
#include "qsparseprop/formats.hpp"

namespace qsp::ref {

// ---- Linear: X B x K, W N x K (CSR), Y B x N ------------------------------

void linear_fwd_f32(const csr_pattern &p, const float *w, const float *src, const float *bias,
                    float *dst, int64_t batch, int num_threads);
void linear_bwd_data_f32(const csr_pattern &p, const float *w, const float *diff_dst,
                         float *diff_src, int64_t batch, int num_threads);
void linear_bwd_weights_f32(const csr_pattern &p, const float *src, const float *diff_dst,
                            float *diff_w, int64_t batch, int num_threads);
void linear_fwd_s8(const csr_pattern &p, const int8_t *wq, const float *w_scale,
                   const int8_t *src_q, float src_scale, const float *bias, float *dst,
                   int64_t batch, int num_threads);
void linear_bwd_data_s8(const csr_pattern &p, const int8_t *wq, const int8_t *diff_dst_q,
                        float diff_dst_scale, float *diff_src, int64_t batch, int num_threads);
void linear_bwd_weights_s8(const csr_pattern &p, const int8_t *src_q, float src_scale,
                           const int8_t *diff_dst_q, float diff_dst_scale, float *diff_w,
                           int64_t batch, int num_threads);

// ---- Conv2d: X N x C x H x W, W OC x (C/G * KH * KW) (CSR), Y N x OC x OH x OW

using detail::conv2d_shape;

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
