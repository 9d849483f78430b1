// The SDDMM kernel family (backward-weights) in the tile layout of
// tile_abi.hpp, one skeleton for every ISA:
//   diff_values[e] += dot(dy_tile[r, :], x_tile[c, :])   for e = (r, c) in the pattern
// A group of nonzeros of a row (16 on AVX-512, 8 on AVX2) is computed as
// that many vectors of partial dot products, reduced together by one
// shuffle tree (jit_reduce.hpp) instead of a horizontal sum each, and added
// to diff_values with a mask for the row's last group.
//
//   f32  tiles of f32; n_vec multiply-adds per nonzero; diff_values f32.
//   s8   tiles of int8 (row = 64 bytes): dy_tile holds G + 128 as u8, x_tile
//        X as s8; u8 x s8 dot products (vpdpbusd) or, without VNNI, G
//        itself times X in int16 (exact);
//        diff_values int32 sums of (G + sddmm_dy_shift()) * X: the caller
//        subtracts sddmm_dy_shift() * sum_b X (128 with vpdpbusd, else 0).
#pragma once

#include <memory>

#include "jit/jit_sparse_kernel.hpp"
#include "jit/tile_abi.hpp"

namespace qsp::jit {

using jit_sddmm_kernel = jit_sparse_kernel<sddmm_call_params>;

template <cpu_isa isa> class jit_uni_sddmm_kernel_t : public jit_sddmm_kernel {
public:
    explicit jit_uni_sddmm_kernel_t(const sparse_kernel_params &params);

private:
    void generate() override;
};

// The code for params (s8 takes n_vec = 1: a 64-byte row is read whole),
// generated once per process and shared by all layers.
std::shared_ptr<const jit_sddmm_kernel> sddmm_kernel(const sparse_kernel_params &params);

// The shift the s8 kernel for params leaves in its sums (above): 128, or 0
// (without VNNI: AVX2 without AVX-VNNI, avx512_core; f32: 0).
int sddmm_dy_shift(const sparse_kernel_params &params);

} // namespace qsp::jit
