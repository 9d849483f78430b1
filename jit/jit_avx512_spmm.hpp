// AVX-512 kernels for sparse x dense products in the batch-innermost
// ("tile") layout: a tile holds 64 batch elements of every row, contiguous
// (row r of a tile starts at r * 256 bytes), so one entry (r, c, w) of the
// sparse matrix costs one broadcast and n_vec vector operations.
//
//   spmm  dst_tile[r, :] = sum_{c in row r} w(r,c) * src_tile[c, :]
//         (forward with the CSR of W; backward-data with its transpose)
// (backward-weights is the SDDMM of jit_avx512_sddmm.hpp)
//
//   f32        (avx512_core)  entries are nonzeros; src rows are 64 floats.
//   s8_quads   (avx512_core_vnni) entries are non-empty *quads* of 4
//              consecutive columns (DESIGN.md 3.2 "k-quad"): src row c holds,
//              for 64 batch elements, the 4 bytes of columns 4c..4c+3 as u8
//              (value + 128); w is the quad's 4 int8 weights packed in a
//              dword (0 where the quad has no nonzero), and one vpdpbusd per
//              16 batch elements does the 4 multiply-adds. dst is int32
//              sums of (x + 128) * w: the caller subtracts 128 * sum(w).
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
    const void *values;         // per entry: f32 weight, or the s8 quad dword
    const int32_t *src_offsets; // per entry: source row * tile_row_bytes
    const int64_t *row_ptr;
    int64_t row_begin, row_end;
    const void *src_tile;
    void *dst_tile; // f32 or int32
};

// s8_quads_bw: the same as s8_quads without VNNI (AVX-512BW nibble dot
// products, jit_int8_dot.hpp).
enum class spmm_type { f32, s8_quads, s8_quads_bw };

class jit_avx512_spmm_kernel : public jit_generator {
public:
    jit_avx512_spmm_kernel(spmm_type type, int n_vec);
    void operator()(const spmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    spmm_type type_;
    int n_vec_;
    void (*fn_)(const spmm_call_params *) = nullptr;
};

} // namespace qsp::jit
