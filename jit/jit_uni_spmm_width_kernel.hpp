// The width SpMM kernel family (Conv2d forward and backward-data, output
// width innermost; see spmm_width_call_params in width_abi.hpp): a block of
// n_rows output rows x n_vec vectors of one channel stays in registers while
// the channel's entries stream past, each a broadcast and one multiply-add
// per vector read straight from the padded source planes; the epilogue adds
// the bias (s8: removes the +128 shift, dequantizes) and stores the rows.
// f32, and s8 over quads (vpdpbusd, or its exact emulation), on every tier;
// without VNNI (avx2 without AVX-VNNI, avx512_core) s8 over pairs of u16
// (vpmaddwd, s8_word::pair).
#pragma once

#include <memory>

#include "jit/jit_sparse_kernel.hpp"
#include "jit/width_abi.hpp"

namespace qsp::jit {

using jit_spmm_width_kernel = jit_sparse_kernel<spmm_width_call_params>;

// Rows x vectors per step are bounded by the vector registers left for sums
// (rows are displacements from one source register: the row step is the
// kernel's); rows alone by the code, which holds a block for every count of
// rows below n_rows (the rows an image leaves), so it grows as n_rows^2.
constexpr int width_max_rows = 16;
int spmm_width_max_accumulators(cpu_isa isa, sparse_dtype dtype, bool avx_vnni,
                                s8_word word = s8_word::quad);

template <cpu_isa isa> class jit_uni_spmm_width_kernel_t : public jit_spmm_width_kernel {
public:
    explicit jit_uni_spmm_width_kernel_t(const sparse_kernel_params &params);

private:
    void generate() override;
};

// The code for params, generated once per process and shared by the layers
// whose params (row step included) are the same.
std::shared_ptr<const jit_spmm_width_kernel> spmm_width_kernel(const sparse_kernel_params &params);

} // namespace qsp::jit
