// AVX-512 f32 kernels for sparse x dense products in the batch-innermost
// ("tile") layout: a tile holds 64 batch elements of every row, contiguous
// (row r of a tile starts at r * 256 bytes), so one nonzero (r, c, w) of the
// sparse matrix costs one broadcast and n_vec FMAs on whole vectors.
//
//   spmm  dst_tile[r, :] = sum_{c in row r} w(r,c) * src_tile[c, :]
//         (forward with the CSR of W; backward-data with its transpose)
// (backward-weights is the SDDMM of jit_avx512_sddmm.hpp)
//
// Lanes past the batch are zero in every tile (the packing pass pads them),
// so kernels always work on full vectors; the batch tail only changes n_vec
// (1..4 vectors of 16), which is why four variants are generated per layer
// and no code is ever regenerated when the batch size changes.
#pragma once

#include <array>
#include <cstdint>

#include "jit/jit_generator.hpp"

namespace qsp::jit {

constexpr int tile_batch = 64; // batch elements per tile
constexpr int tile_row_bytes = tile_batch * 4;

struct spmm_call_params {
    const float *values;        // in pattern order
    const int32_t *src_offsets; // per nonzero: column * tile_row_bytes
    const int64_t *row_ptr;
    int64_t row_begin, row_end;
    const float *src_tile;
    float *dst_tile;
};

class jit_avx512_spmm_f32_kernel : public jit_generator {
public:
    explicit jit_avx512_spmm_f32_kernel(int n_vec);
    void operator()(const spmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    int n_vec_;
    void (*fn_)(const spmm_call_params *) = nullptr;
};

} // namespace qsp::jit
