// The AVX2 tier of the s8 sparse kernels: the k-quad SpMM (forward,
// backward-data) and the SDDMM (backward-weights) of jit_avx512_spmm.hpp /
// jit_avx512_sddmm.hpp on 8-lane ymm registers, with the u8 x s8 dot products
// done exactly by nibble splitting (jit_int8_dot.hpp). Same tile layouts and
// call parameters; a 64-byte s8 tile row is two ymm, a quad row eight.
// With avx_vnni (CPUs with AVX-VNNI) the dot products are VEX vpdpbusd
// instead; that variant is exercised by the tests only on such CPUs (the
// development machine has none).
#pragma once

#include "jit/jit_avx512_sddmm.hpp"
#include "jit/jit_avx512_spmm.hpp"
#include "jit/jit_generator.hpp"

namespace qsp::jit {

class jit_avx2_spmm_s8_kernel : public jit_generator {
public:
    jit_avx2_spmm_s8_kernel(int n_vec, bool avx_vnni); // 8 batch elements per vector: 1..8
    void operator()(const spmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    int n_vec_;
    bool avx_vnni_;
    void (*fn_)(const spmm_call_params *) = nullptr;
};

class jit_avx2_sddmm_s8_kernel : public jit_generator {
public:
    explicit jit_avx2_sddmm_s8_kernel(bool avx_vnni);
    void operator()(const sddmm_call_params &p) const { fn_(&p); }

private:
    void generate() override;
    bool avx_vnni_;
    void (*fn_)(const sddmm_call_params *) = nullptr;
};

} // namespace qsp::jit
