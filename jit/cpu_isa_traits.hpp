// Per-tier facts the generators share, stated once (oneDNN's
// cpu_isa_traits): the vector register type and its width, how many there
// are, and whether an s8 dot product is one instruction or an exact emulation.
#pragma once

#include <type_traits>

#include <xbyak/xbyak.h>

#include "jit/jit_sparse_kernel.hpp"

namespace qsp::jit {

template <cpu_isa isa> struct cpu_isa_traits {
    static_assert(isa >= cpu_isa::avx2, "the JIT tiers start at avx2");
    static constexpr bool avx512 = isa >= cpu_isa::avx512_core;
    using Vmm = std::conditional_t<avx512, Xbyak::Zmm, Xbyak::Ymm>;
    static constexpr int vlen = avx512 ? 64 : 32;    // bytes per vector register
    static constexpr int n_vregs = avx512 ? 32 : 16; // vector registers
};

// The number of vector registers of a tier, where it is a run-time value.
inline int vector_registers(cpu_isa isa) {
    return isa >= cpu_isa::avx512_core ? 32 : 16;
}

// s8 dot products run natively (vpdpbusd) with VNNI, or on the avx2 tier
// with AVX-VNNI (VEX-encoded); elsewhere (emulated_dot) the kernels multiply
// exactly in int16 (pairs, entry pairs, signed bytes, widened operands:
// jit::s8_word) or, for quad words, emulate vpdpbusd (jit_int8_dot.hpp).
inline bool native_dot(cpu_isa isa, sparse_dtype dtype, bool avx_vnni) {
    return dtype == sparse_dtype::s8 && (isa == cpu_isa::avx512_core_vnni || avx_vnni);
}
inline bool emulated_dot(cpu_isa isa, sparse_dtype dtype, bool avx_vnni) {
    return dtype == sparse_dtype::s8 && !native_dot(isa, dtype, avx_vnni);
}

} // namespace qsp::jit
