// The SpMM kernel family (forward and backward-data) in the tile layout of
// tile_abi.hpp, one skeleton for every ISA (oneDNN's jit_uni_*<isa> shape):
// one entry (r, c, w) of the sparse matrix costs one broadcast of w and
// n_vec vector multiply-adds into row r's accumulators.
//
//   f32      entries are nonzeros; a tile row is 64 floats.
//   s8       entries are non-empty *quads* of 4 consecutive columns (the
//            "k-quad" layout): w is the quad's 4 int8 weights packed in a
//            dword (0 where the quad has no nonzero) and the source row holds
//            the 4 bytes of those columns as u8 (x + 128) per batch element,
//            so one u8 x s8 dot product per batch lane does 4 multiply-adds.
//            dst receives int32 sums of (x + 128) * w: the caller subtracts
//            128 * sum(w), which makes the result exact.
//
// ISA tiers: avx512_core_vnni (zmm, vpdpbusd), avx512_core (zmm; s8 dot
// products emulated exactly with nibbles, jit_int8_dot.hpp), avx2 (ymm;
// s8 with VEX vpdpbusd when the CPU has AVX-VNNI, else emulated).
#pragma once

#include <memory>

#include "jit/jit_sparse_kernel.hpp"
#include "jit/tile_abi.hpp"

namespace qsp::jit {

using jit_spmm_kernel = jit_sparse_kernel<spmm_call_params>;

template <cpu_isa isa> class jit_uni_spmm_kernel_t : public jit_spmm_kernel {
public:
    explicit jit_uni_spmm_kernel_t(const sparse_kernel_params &params);

private:
    void generate() override;
};

// The code for params, generated once per process and shared by all layers
// (the pattern lives in the plan's arrays, not in this code); throws
// std::invalid_argument for parameters no tier supports.
std::shared_ptr<const jit_spmm_kernel> spmm_kernel(const sparse_kernel_params &params);

} // namespace qsp::jit
