// The width SDDMM kernel family (Conv2d backward-weights, output width
// innermost; see sddmm_width_call_params in width_abi.hpp): a block of
// n_rows dY rows x n_vec vectors of one channel sits in registers while the
// channel's entries stream past, each multiplying it by its x window (read
// from the padded planes) into a few independent sums that are added to the
// entry's vector of partial sums. f32, and s8 (u8 dY x s8 x, vpdpbusd or its
// exact emulation), on every tier.
#pragma once

#include <memory>

#include "jit/jit_sparse_kernel.hpp"
#include "jit/width_abi.hpp"

namespace qsp::jit {

using jit_sddmm_width_kernel = jit_sparse_kernel<sddmm_width_call_params>;

// n_rows x n_vec dY vectors are held in registers: at most this many.
int sddmm_width_max_dy_vectors(cpu_isa isa, sparse_dtype dtype, bool avx_vnni);

template <cpu_isa isa> class jit_uni_sddmm_width_kernel_t : public jit_sddmm_width_kernel {
public:
    explicit jit_uni_sddmm_width_kernel_t(const sparse_kernel_params &params);

private:
    void generate() override;
};

std::shared_ptr<const jit_sddmm_width_kernel>
sddmm_width_kernel(const sparse_kernel_params &params);

} // namespace qsp::jit
