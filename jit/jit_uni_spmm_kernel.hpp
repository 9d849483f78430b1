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

#include "jit/jit_generator.hpp"
#include "jit/tile_abi.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::jit {

enum class sparse_dtype { f32, s8 };

// Everything a generated sparse kernel is specialised for: the key of the
// code cache (compared field by field).
struct sparse_kernel_params {
    cpu_isa isa = cpu_isa::avx2;
    sparse_dtype dtype = sparse_dtype::f32;
    int n_vec = 1;         // vectors per tile row this kernel touches (batch tail)
    bool avx_vnni = false; // avx2 + s8 only: VEX vpdpbusd instead of emulation

    bool operator==(const sparse_kernel_params &o) const {
        return isa == o.isa && dtype == o.dtype && n_vec == o.n_vec && avx_vnni == o.avx_vnni;
    }
    std::string str() const;
};
struct sparse_kernel_params_hash {
    size_t operator()(const sparse_kernel_params &p) const;
};

// Batch lanes per vector register of the tier (f32: floats; s8: the dword
// lanes of one batch element each): 16 on AVX-512, 8 on AVX2.
int vector_lanes(cpu_isa isa);

// The parameters for a tier; avx_vnni is decided from the CPU.
sparse_kernel_params make_sparse_kernel_params(cpu_isa isa, sparse_dtype dtype, int n_vec);

class jit_spmm_kernel : public jit_generator {
public:
    void operator()(const spmm_call_params &p) const { fn_(&p); }
    const sparse_kernel_params &params() const { return params_; }

protected:
    jit_spmm_kernel(const sparse_kernel_params &params);
    void finish() { fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel())); }
    sparse_kernel_params params_;

private:
    void (*fn_)(const spmm_call_params *) = nullptr;
};

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
