// "jit:avx512_core_vnni" for sparse Linear in s8: backward-weights, where
// int8 wins most (DESIGN.md 3.1): dW at the nonzeros is a dot product over
// the batch, and one vpdpbusd multiplies 64 int8 pairs. vpdpbusd is
// unsigned x signed, so G1 is stored shifted by +128 and the exact term
// 128 * sum_b X[b, k] is subtracted afterwards (no sign tricks). The sums
// are exact int32 (255 * 127 * batch < 2^31 for batch <= 65536), so the
// result equals the reference bit for bit.
#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>

#include <omp.h>

#include "jit/jit_avx512_sddmm.hpp"
#include "primitives/jit_linear_s8.hpp"
#include "primitives/quantize.hpp"
#include "primitives/scratch.hpp"
#include "primitives/tile_layout.hpp"
#include "qsparseprop/quantization.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/kernel_cache.hpp"
#include "runtime/verbose.hpp"

namespace qsp::detail {

namespace {

using sddmm_kernel = jit::jit_avx512_sddmm_kernel;

std::shared_ptr<const sddmm_kernel> vnni_sddmm_code() {
    static runtime::kernel_cache<sddmm_kernel> cache;
    runtime::kernel_key key{
            "avx512_vnni_sddmm_s8", 0, {1}, 1, static_cast<int>(cpu_isa::avx512_core_vnni), 0, 0};
    return cache.get_or_create(
            key, [] { return std::make_shared<const sddmm_kernel>(jit::sddmm_type::s8_vnni, 1); });
}

class jit_linear_s8_bwd_weights_kernel : public kernel {
public:
    explicit jit_linear_s8_bwd_weights_kernel(const problem &p) : p_(p) {
        const int64_t nnz = p.pattern.nnz();
        const int32_t *ci = p.pattern.col_idx();
        offsets_.assign(static_cast<size_t>(nnz) + 16, 0); // +16: a group may read past the row
        for (int64_t e = 0; e < nnz; ++e)
            offsets_[e] = static_cast<int32_t>(int64_t(ci[e]) * jit::s8_tile_row_bytes);
        bounds_ = balance_rows(p.pattern.row_ptr(), p.out, std::max(1, p.num_threads));
        code_ = vnni_sddmm_code();
        p_.batch = 0; // the plan serves every batch size
    }

    void execute(const tensors &t) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t tiles = tile_count(B), tb = jit::tile_batch;
        float sx;
        std::memcpy(&sx, t.workspace, sizeof(float));
        const auto *xq = reinterpret_cast<const int8_t *>(t.workspace + workspace_header_bytes);
        auto *g_tiles = scratch<uint8_t>(0, tiles * N * tb);
        auto *x_tiles = scratch<int8_t>(1, tiles * K * tb);
        auto *col_sum = scratch<int32_t>(2, K);
        auto *acc = scratch<int32_t>(3, nnz);
        const float sg1 = quantize_stochastic_to_s8_tiles_avx512(
                t.diff_dst, B, N, rounding_seed32(2 * t.seed), g_tiles, nt);
        pack_s8_tiles_avx512(xq, B, K, x_tiles, nt);
        column_sums_s8(xq, B, K, col_sum, nt);
        std::fill(acc, acc + nnz, 0);
        const int parts = static_cast<int>(bounds_.size()) - 1;
#pragma omp parallel num_threads(nt)
        {
            const int nthr = omp_get_num_threads(), tid = omp_get_thread_num();
            for (int part = tid; part < parts; part += nthr)
                for (int64_t tile = 0; tile < tiles; ++tile) {
                    jit::sddmm_call_params c{offsets_.data(),
                                             p_.pattern.row_ptr(),
                                             bounds_[part],
                                             bounds_[part + 1],
                                             x_tiles + tile * K * tb,
                                             g_tiles + tile * N * tb,
                                             acc};
                    (*code_)(c);
                }
        }
        const float scale = sg1 * sx;
        const int64_t *rp = p_.pattern.row_ptr();
        const int32_t *ci = p_.pattern.col_idx();
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t n = 0; n < N; ++n)
            for (int64_t e = rp[n]; e < rp[n + 1]; ++e)
                t.diff_weights[e] = static_cast<float>(acc[e] - 128 * col_sum[ci[e]]) * scale;
        if (t.diff_bias) ref::bias_grad(t.diff_dst, t.diff_bias, B, N, 1, nt);
    }

private:
    problem p_;
    std::vector<int32_t> offsets_;
    std::vector<int64_t> bounds_;
    std::shared_ptr<const sddmm_kernel> code_;
};

runtime::kernel_cache<kernel> &plan_cache() {
    static runtime::kernel_cache<kernel> cache;
    return cache;
}

} // namespace

implementation jit_avx512_vnni_linear_s8_implementation() {
    return {"jit:avx512_core_vnni",
            [](const problem &p) -> std::string {
                if (p.op != op_kind::linear) return "Linear only";
                if (p.scheme != quant_scheme::s8) return "s8 only";
                if (p.dir != direction::backward_weights)
                    return "only backward_weights has a sparse VNNI kernel yet";
                if (effective_cpu_isa() < cpu_isa::avx512_core_vnni)
                    return std::string("needs avx512_core_vnni, effective ISA is ")
                           + to_string(effective_cpu_isa());
                if (p.batch > int32_safe_reduction_length)
                    return "batch " + std::to_string(p.batch) + " > "
                           + std::to_string(int32_safe_reduction_length)
                           + " could overflow the int32 accumulators";
                if (p.in > (int64_t(1) << 31) / jit::s8_tile_row_bytes)
                    return "in_features exceed the tile offsets";
                return "";
            },
            [](const problem &p) -> std::shared_ptr<const kernel> {
                runtime::kernel_key key{"linear_s8",
                                        static_cast<int>(p.dir),
                                        {p.in, p.out},
                                        1,
                                        static_cast<int>(cpu_isa::avx512_core_vnni),
                                        p.num_threads,
                                        p.pattern.hash()};
                const double t0 = runtime::now_ms();
                bool generated = false;
                auto plan = plan_cache().get_or_create(
                        key,
                        [&] { return std::make_shared<const jit_linear_s8_bwd_weights_kernel>(p); },
                        &generated);
                if (verbose_level() >= 1) {
                    std::ostringstream line;
                    line << "jit,plan," << key.str() << ","
                         << (generated ? "generated" : "cache_hit") << ","
                         << runtime::now_ms() - t0;
                    runtime::verbose_print(line.str());
                }
                return plan;
            }};
}

} // namespace qsp::detail
