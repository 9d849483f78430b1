// SDDMM kernels for backward-weights in the tile layout:
//   dw(r,c) += dot(dy_tile[r, :], x_tile[c, :])   for (r,c) in the pattern
// 16 nonzeros of a row are computed as 16 vectors of partial dot products
// and reduced together by one shuffle tree (jit_reduce16.hpp), then added to
// dw with a mask for the row's last group.
//
//   f32     (avx512_core)      tiles of f32 (row = 64 floats = 256 bytes); n_vec
//                              FMAs per nonzero; dw f32.
//   s8_vnni (avx512_core_vnni) tiles of int8 (row = 64 bytes): dy_tile holds
//                              G + 128 as u8, x_tile holds X as s8; one vpdpbusd
//                              (64 multiply-adds) per nonzero; dw int32 sums of
//                              (G + 128) * X: the caller subtracts 128 * sum_b X.
#pragma once

#include <cstdint>

#include "jit/jit_avx512_spmm.hpp"
#include "jit/jit_generator.hpp"

namespace qsp::jit {

constexpr int s8_tile_row_bytes = tile_batch; // one byte per batch element

struct sddmm_call_params {
    const int32_t *src_offsets; // per nonzero: column * tile_row_bytes (+16 readable pad entries)
    const int64_t *row_ptr;
    int64_t row_begin, row_end;
    const void *x_tile;
    const void *dy_tile;
    void *diff_values; // accumulated into (f32 or int32)
};

// s8_bw: s8_vnni without VNNI (AVX-512BW nibble dot products, jit_int8_dot.hpp).
enum class sddmm_type { f32, s8_vnni, s8_bw };

class jit_avx512_sddmm_kernel : public jit_generator {
public:
    // n_vec: 16-lane vectors per tile row (f32: 1..4; s8_vnni: always 1,
    // a 64-byte row is one vector).
    jit_avx512_sddmm_kernel(sddmm_type type, int n_vec);
    void operator()(const sddmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    sddmm_type type_;
    int n_vec_;
    void (*fn_)(const sddmm_call_params *) = nullptr;
};

} // namespace qsp::jit
