// The s8 quantization passes at speed: AVX-512 when the effective ISA has
// it, the reference otherwise. Bit-identical to primitives/ref (tested): the
// same float operations in the same order, just 16 lanes at a time.
#pragma once

#include <cstdint>

#include "qsparseprop/formats.hpp"

namespace qsp::detail {

float fast_quantize_rne(const float *x, int64_t n, int8_t *q, int num_threads);
// Linear only (inner == 1): multiplier indexed by i % channels.
float fast_quantize_stochastic(const float *x, int64_t n, const float *multiplier, int64_t channels,
                               uint32_t seed32, int8_t *q, int num_threads);

// Per-row (output channel) weight quantization, as ref::quantize_weights.
void fast_quantize_weights(const csr_pattern &p, const float *values, int8_t *q, float *scale,
                           int num_threads);

// The AVX2 bodies (quantize_avx2.cpp).
float quantize_rne_avx2(const float *x, int64_t n, int8_t *q, int num_threads);
float quantize_stochastic_avx2(const float *x, int64_t n, const float *multiplier, int64_t channels,
                               uint32_t seed32, int8_t *q, int num_threads);

// The AVX-512 bodies (quantize_avx512.cpp).
void quantize_weights_avx512(const int64_t *row_ptr, int64_t rows, const float *values, int8_t *q,
                             float *scale, int num_threads);
float quantize_rne_avx512(const float *x, int64_t n, int8_t *q, int num_threads);
float quantize_stochastic_avx512(const float *x, int64_t n, const float *multiplier,
                                 int64_t channels, uint32_t seed32, int8_t *q, int num_threads);

// The s8 JIT's tile passes, AVX-512 or portable (same results).
float quantize_stochastic_to_s8_tiles(const float *x, int64_t batch, int64_t channels,
                                      uint32_t seed32, uint8_t *tiles, int num_threads);
void pack_s8_tiles(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                   int num_threads);
void pack_quad_tiles(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                     int num_threads);
void unpack_s32_tiles(const int32_t *tiles, int64_t batch, int64_t channels,
                      const int32_t *correction, const float *scale, const float *bias, float *dst,
                      int num_threads);

// Backward-weights operands of the s8 VNNI kernel, in the int8 tile layout
// (batch-innermost, 64 bytes per row; tile_layout.hpp):
// G1 = sr(dY / sg1) stored as G1 + 128 (u8; padding 128, i.e. G = 0), the
// same integers as ref::quantize_stochastic with inner = 1; returns sg1.
float quantize_stochastic_to_s8_tiles_avx512(const float *x, int64_t batch, int64_t channels,
                                             uint32_t seed32, uint8_t *tiles, int num_threads);
// int8 [batch x channels] -> int8 tiles (padding 0).
void pack_s8_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, int8_t *tiles,
                          int num_threads);
// int8 [batch x channels] -> "quad" tiles for the s8 SpMM: for each tile
// and quad of 4 columns, 64 batch dwords holding the 4 bytes as u8 (x + 128).
void pack_quad_tiles_avx512(const int8_t *x, int64_t batch, int64_t channels, uint8_t *tiles,
                            int num_threads);
// int32 tiles (channels x 64 per tile) -> dst[b, c] =
// float(tile - correction[c]) * scale[c] (+ bias[c]).
void unpack_s32_tiles_avx512(const int32_t *tiles, int64_t batch, int64_t channels,
                             const int32_t *correction, const float *scale, const float *bias,
                             float *dst, int num_threads);
// sums[c] = sum_b x[b, c].
void column_sums_s8(const int8_t *x, int64_t batch, int64_t channels, int32_t *sums,
                    int num_threads);

} // namespace qsp::detail
