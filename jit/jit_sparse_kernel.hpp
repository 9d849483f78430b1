// What the sparse kernel families (SpMM, SDDMM) share: the parameters a
// generated kernel is specialised for (the key of the code caches), and a
// generator base that calls the code with the family's call parameters.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include "jit/jit_generator.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::jit {

enum class sparse_dtype { f32, s8 };

struct sparse_kernel_params {
    cpu_isa isa = cpu_isa::avx2;
    sparse_dtype dtype = sparse_dtype::f32;
    int n_vec = 1;         // vectors per tile row this kernel touches (batch tail)
    bool avx_vnni = false; // avx2 + s8 only: VEX vpdpbusd instead of emulation
    // Output-width-innermost kernels (width_abi.hpp) only: output rows per
    // step, and the lanes of the last vector that are real (0: all).
    int n_rows = 1;
    int tail = 0;

    bool operator==(const sparse_kernel_params &o) const {
        return isa == o.isa && dtype == o.dtype && n_vec == o.n_vec && avx_vnni == o.avx_vnni
               && n_rows == o.n_rows && tail == o.tail;
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

template <typename call_params_t> class jit_sparse_kernel : public jit_generator {
public:
    void operator()(const call_params_t &p) const { fn_(&p); }
    const sparse_kernel_params &params() const { return params_; }

protected:
    // Code of one kernel stays far below this; the bound only guards mistakes.
    static constexpr size_t max_code_bytes = 32 * 1024;

    jit_sparse_kernel(const char *family, const sparse_kernel_params &params,
                      size_t code_bytes = max_code_bytes)
        : jit_generator(std::string(family) + "_" + params.str(), code_bytes), params_(params) {}
    // Generates and seals the code; call at the end of the most derived
    // constructor (generate() is virtual).
    void finish() { fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel())); }

    sparse_kernel_params params_;

private:
    void (*fn_)(const call_params_t *) = nullptr;
};

// kernel_t<params.isa>, for the tiers that have generated code.
template <template <cpu_isa> class kernel_t, typename base_t>
std::shared_ptr<const base_t> make_for_isa(const sparse_kernel_params &params, const char *family) {
    switch (params.isa) {
        case cpu_isa::avx2:
            return std::make_shared<const kernel_t<cpu_isa::avx2>>(params);
        case cpu_isa::avx512_core:
            return std::make_shared<const kernel_t<cpu_isa::avx512_core>>(params);
        case cpu_isa::avx512_core_vnni:
            return std::make_shared<const kernel_t<cpu_isa::avx512_core_vnni>>(params);
        case cpu_isa::ref:
            break;
    }
    throw std::invalid_argument(std::string("jit ") + family
                                + ": the reference tier has no generated code");
}

} // namespace qsp::jit
