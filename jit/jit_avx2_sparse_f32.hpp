// The AVX2 (+FMA) tier of the f32 sparse kernels, for CPUs without AVX-512:
// the same tile layout, call parameters and algorithms as the AVX-512
// kernels (jit_avx512_spmm.hpp, jit_avx512_sddmm.hpp) on 8-lane ymm
// registers. A 64-element tile row is up to 8 vectors (n_vec 1..8); the
// SDDMM reduces 8 nonzeros per shuffle tree and masks its stores with
// vmaskmovps. AVX2 has 16 vector registers, so the SpMM keeps one
// accumulator set (8 vectors already hide the FMA latency) and the SDDMM
// reads dY from L1 instead of holding it in registers.
#pragma once

#include "jit/jit_avx512_sddmm.hpp"
#include "jit/jit_avx512_spmm.hpp"
#include "jit/jit_generator.hpp"

namespace qsp::jit {

constexpr int avx2_lanes = 8;

class jit_avx2_spmm_f32_kernel : public jit_generator {
public:
    explicit jit_avx2_spmm_f32_kernel(int n_vec);
    void operator()(const spmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    int n_vec_;
    void (*fn_)(const spmm_call_params *) = nullptr;
};

class jit_avx2_sddmm_f32_kernel : public jit_generator {
public:
    explicit jit_avx2_sddmm_f32_kernel(int n_vec);
    void operator()(const sddmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    int n_vec_;
    void (*fn_)(const sddmm_call_params *) = nullptr;
};

} // namespace qsp::jit
