// The scatter SpMM kernel family (Conv2d forward and backward-data; see
// spmm_scatter_call_params in tile_abi.hpp): per pixel, each source row is
// loaded once and its entries add value * row into their destination rows,
// which stay in L1. f32, and s8 over quads (u8 x s8 dot products of 4
// channels per batch lane, vpdpbusd or emulated exactly), on every tier;
// without VNNI (avx2 without AVX-VNNI, avx512_core) s8 over pairs of u16
// (vpmaddwd, s8_word::pair).
#pragma once

#include <memory>

#include "jit/jit_sparse_kernel.hpp"
#include "jit/tile_abi.hpp"

namespace qsp::jit {

using jit_spmm_scatter_kernel = jit_sparse_kernel<spmm_scatter_call_params>;

template <cpu_isa isa> class jit_uni_spmm_scatter_kernel_t : public jit_spmm_scatter_kernel {
public:
    explicit jit_uni_spmm_scatter_kernel_t(const sparse_kernel_params &params);

private:
    void generate() override;
};

// The code for params, generated once per process and shared by all layers.
std::shared_ptr<const jit_spmm_scatter_kernel>
spmm_scatter_kernel(const sparse_kernel_params &params);

} // namespace qsp::jit
