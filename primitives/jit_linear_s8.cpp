// "jit:avx512_core_vnni" for sparse Linear in s8, on vpdpbusd (u8 x s8,
// 4 multiply-adds per 32-bit lane), and "jit:avx512_core", the same kernels
// with vpdpbusd emulated exactly on AVX-512BW (jit/jit_int8_dot.hpp). The unsigned operand is
// always stored shifted by +128 and the exact term 128 * sum(other operand) subtracted afterwards
// (no sign tricks: the peer's is wrong at -128). Sums are exact int32 (255 * 127 * length < 2^31
// for lengths <= 65536), so every result equals the reference bit for bit.
//
//   forward        SpMM over "k-quads" (DESIGN.md 3.2): one vpdpbusd per 16
//                  batch elements per non-empty quad of 4 columns of a row.
//   backward-data  the same over the transposed pattern (quads of rows).
//   backward-weights SDDMM (DESIGN.md 3.1): one vpdpbusd per nonzero per 64
//                  batch elements, 16 nonzeros reduced together.
#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <memory>

#include <omp.h>

#include "jit/jit_avx2_sparse_f32.hpp"
#include "jit/jit_avx2_sparse_s8.hpp"
#include "jit/jit_avx512_sddmm.hpp"
#include "primitives/jit_linear_s8.hpp"
#include "primitives/plan_cache.hpp"
#include "primitives/quantize.hpp"
#include "primitives/scratch.hpp"
#include "primitives/tile_layout.hpp"
#include "qsparseprop/quantization.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/kernel_cache.hpp"

namespace qsp::detail {

namespace {

using sddmm_kernel = jit::jit_avx512_sddmm_kernel;
using spmm_kernel = jit::jit_avx512_spmm_kernel;

using spmm_call = std::function<void(const jit::spmm_call_params &)>;
using sddmm_call = std::function<void(const jit::sddmm_call_params &)>;

// Generic code shared by all layers, for the tier: VNNI, AVX-512BW (emulated
// dot products) or AVX2 (emulated, ymm).
sddmm_call sddmm_code(cpu_isa isa) {
    static runtime::kernel_cache<jit::jit_generator> cache;
    const bool avx_vnni = isa == cpu_isa::avx2 && cpu_has_avx_vnni();
    runtime::kernel_key key{"sddmm_s8", 0, {1, avx_vnni}, 1, static_cast<int>(isa), 0, 0};
    if (isa == cpu_isa::avx2) {
        auto k = std::static_pointer_cast<const jit::jit_avx2_sddmm_s8_kernel>(
                cache.get_or_create(key, [avx_vnni] {
                    return std::make_shared<const jit::jit_avx2_sddmm_s8_kernel>(avx_vnni);
                }));
        return [k](const jit::sddmm_call_params &c) { (*k)(c); };
    }
    auto k = std::static_pointer_cast<const sddmm_kernel>(cache.get_or_create(key, [isa] {
        return std::make_shared<const sddmm_kernel>(isa == cpu_isa::avx512_core_vnni
                                                            ? jit::sddmm_type::s8_vnni
                                                            : jit::sddmm_type::s8_bw,
                                                    1);
    }));
    return [k](const jit::sddmm_call_params &c) { (*k)(c); };
}

std::vector<spmm_call> spmm_code(cpu_isa isa) {
    static runtime::kernel_cache<jit::jit_generator> cache;
    const int variants = isa == cpu_isa::avx2 ? jit::tile_batch / jit::avx2_lanes : 4;
    const bool avx_vnni = isa == cpu_isa::avx2 && cpu_has_avx_vnni();
    std::vector<spmm_call> out;
    for (int nv = 1; nv <= variants; ++nv) {
        runtime::kernel_key key{"spmm_s8q", 0, {nv, avx_vnni}, 1, static_cast<int>(isa), 0, 0};
        if (isa == cpu_isa::avx2) {
            auto k = std::static_pointer_cast<const jit::jit_avx2_spmm_s8_kernel>(
                    cache.get_or_create(key, [nv, avx_vnni] {
                        return std::make_shared<const jit::jit_avx2_spmm_s8_kernel>(nv, avx_vnni);
                    }));
            out.emplace_back([k](const jit::spmm_call_params &c) { (*k)(c); });
        } else {
            auto k =
                    std::static_pointer_cast<const spmm_kernel>(cache.get_or_create(key, [nv, isa] {
                        return std::make_shared<const spmm_kernel>(
                                isa == cpu_isa::avx512_core_vnni ? jit::spmm_type::s8_quads
                                                                 : jit::spmm_type::s8_quads_bw,
                                nv);
                    }));
            out.emplace_back([k](const jit::spmm_call_params &c) { (*k)(c); });
        }
    }
    return out;
}

// Forward (rows = output features, quads over input features) and
// backward-data (rows = input features, quads over output features).
class jit_linear_s8_spmm_kernel : public kernel {
public:
    jit_linear_s8_spmm_kernel(const problem &p, cpu_isa isa)
        : p_(p), lanes_(isa == cpu_isa::avx2 ? jit::avx2_lanes : 16) {
        const csr_pattern &w = p.pattern;
        const int64_t *rp = w.row_ptr();
        const int32_t *ci = w.col_idx();
        const int64_t nnz = w.nnz();
        const bool fwd = p.dir == direction::forward;
        rows_ = fwd ? p.out : p.in;
        // The pattern seen row by row in this direction: local entry l has
        // column col[l] and its value at value_index_[l].
        entry_ptr_.assign(static_cast<size_t>(rows_) + 1, 0);
        std::vector<int64_t> col(static_cast<size_t>(nnz));
        value_index_.resize(static_cast<size_t>(nnz));
        if (fwd) {
            entry_ptr_.assign(rp, rp + rows_ + 1);
            for (int64_t e = 0; e < nnz; ++e) {
                col[e] = ci[e];
                value_index_[e] = e;
            }
        } else {
            for (int64_t e = 0; e < nnz; ++e)
                ++entry_ptr_[ci[e] + 1];
            for (int64_t k = 0; k < rows_; ++k)
                entry_ptr_[k + 1] += entry_ptr_[k];
            std::vector<int64_t> next(entry_ptr_.begin(), entry_ptr_.end() - 1);
            for (int64_t n = 0; n < p.out; ++n)
                for (int64_t e = rp[n]; e < rp[n + 1]; ++e) {
                    const int64_t l = next[ci[e]]++;
                    col[l] = n; // ascending n within a row of the transpose
                    value_index_[l] = e;
                }
        }
        // Quads: consecutive entries of a row with the same col / 4 share one.
        quad_ptr_.assign(static_cast<size_t>(rows_) + 1, 0);
        quad_of_.resize(static_cast<size_t>(nnz));
        byte_of_.resize(static_cast<size_t>(nnz));
        for (int64_t r = 0; r < rows_; ++r) {
            int64_t last = -1;
            for (int64_t l = entry_ptr_[r]; l < entry_ptr_[r + 1]; ++l) {
                if (col[l] / 4 != last) {
                    last = col[l] / 4;
                    offsets_.push_back(static_cast<int32_t>(last * jit::tile_row_bytes));
                }
                quad_of_[l] = static_cast<int64_t>(offsets_.size()) - 1;
                byte_of_[l] = static_cast<uint8_t>(col[l] % 4);
            }
            quad_ptr_[r + 1] = static_cast<int64_t>(offsets_.size());
        }
        bounds_ = balance_rows(quad_ptr_.data(), rows_, std::max(1, p.num_threads));
        code_ = spmm_code(isa);
        p_.batch = 0; // the plan serves every batch size
    }

    void execute(const tensors &t) const override {
        const int nt = p_.num_threads;
        const bool fwd = p_.dir == direction::forward;
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t src_ch = fwd ? K : N, tiles = tile_count(B), tb = jit::tile_batch;
        const int64_t quads = (src_ch + 3) / 4, entries = static_cast<int64_t>(offsets_.size());
        auto *wq = scratch<int8_t>(0, nnz);
        auto *w_scale = scratch<float>(1, N);
        auto *words = scratch<uint32_t>(2, entries);
        auto *correction = scratch<int32_t>(3, rows_);
        auto *src_q = scratch<int8_t>(4, B * src_ch);
        auto *src_tiles = scratch<uint8_t>(5, tiles * quads * tb * 4);
        auto *acc = scratch<int32_t>(6, tiles * rows_ * tb);
        auto *row_scale = scratch<float>(7, rows_);
        fast_quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        // Quad words and the +128 correction of each row, from this step's weights.
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows_; ++r) {
            for (int64_t q = quad_ptr_[r]; q < quad_ptr_[r + 1]; ++q)
                words[q] = 0;
            int32_t sum = 0;
            for (int64_t l = entry_ptr_[r]; l < entry_ptr_[r + 1]; ++l) {
                const int8_t v = wq[value_index_[l]];
                words[quad_of_[l]] |= static_cast<uint32_t>(static_cast<uint8_t>(v))
                                      << (8 * byte_of_[l]);
                sum += v;
            }
            correction[r] = 128 * sum;
        }
        float scale;
        if (fwd) {
            int8_t *xq = t.workspace
                                 ? reinterpret_cast<int8_t *>(t.workspace + workspace_header_bytes)
                                 : src_q;
            scale = fast_quantize_rne(t.src, B * K, xq, nt);
            if (t.workspace) std::memcpy(t.workspace, &scale, sizeof(float));
            pack_quad_tiles(xq, B, K, src_tiles, nt);
            for (int64_t n = 0; n < N; ++n)
                row_scale[n] = scale * w_scale[n];
        } else {
            scale = fast_quantize_stochastic(t.diff_dst, B * N, w_scale, N,
                                             rounding_seed32(2 * t.seed + 1), src_q, nt);
            pack_quad_tiles(src_q, B, N, src_tiles, nt);
            std::fill(row_scale, row_scale + rows_, scale);
        }
        const int parts = static_cast<int>(bounds_.size()) - 1;
#pragma omp parallel num_threads(nt)
        {
            const int nthr = omp_get_num_threads(), tid = omp_get_thread_num();
            for (int part = tid; part < parts; part += nthr)
                for (int64_t tile = 0; tile < tiles; ++tile) {
                    jit::spmm_call_params c{words,
                                            offsets_.data(),
                                            quad_ptr_.data(),
                                            bounds_[part],
                                            bounds_[part + 1],
                                            src_tiles + tile * quads * tb * 4,
                                            acc + tile * rows_ * tb};
                    code_[tile_vectors(B, tile, lanes_) - 1](c);
                }
        }
        unpack_s32_tiles(acc, B, rows_, correction, row_scale, fwd ? t.bias : nullptr,
                         fwd ? t.dst : t.diff_src, nt);
    }

private:
    problem p_;
    int64_t rows_ = 0;
    std::vector<int64_t> entry_ptr_, value_index_, quad_ptr_, quad_of_, bounds_;
    std::vector<uint8_t> byte_of_;
    std::vector<int32_t> offsets_;
    int lanes_;
    std::vector<spmm_call> code_;
};

class jit_linear_s8_bwd_weights_kernel : public kernel {
public:
    jit_linear_s8_bwd_weights_kernel(const problem &p, cpu_isa isa) : p_(p) {
        const int64_t nnz = p.pattern.nnz();
        const int32_t *ci = p.pattern.col_idx();
        offsets_.assign(static_cast<size_t>(nnz) + 16, 0); // +16: a group may read past the row
        for (int64_t e = 0; e < nnz; ++e)
            offsets_[e] = static_cast<int32_t>(int64_t(ci[e]) * jit::s8_tile_row_bytes);
        bounds_ = balance_rows(p.pattern.row_ptr(), p.out, std::max(1, p.num_threads));
        code_ = sddmm_code(isa);
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
        const float sg1 = quantize_stochastic_to_s8_tiles(t.diff_dst, B, N,
                                                          rounding_seed32(2 * t.seed), g_tiles, nt);
        pack_s8_tiles(xq, B, K, x_tiles, nt);
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
                    code_(c);
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
    sddmm_call code_;
};

} // namespace

namespace {

implementation jit_linear_s8_implementation(const char *name, cpu_isa isa) {
    const bool vnni = isa == cpu_isa::avx512_core_vnni;
    return {name,
            [isa, vnni](const problem &p) -> std::string {
                if (p.op != op_kind::linear) return "Linear only";
                if (p.scheme != quant_scheme::s8) return "s8 only";
                if (effective_cpu_isa() < isa)
                    return std::string("needs ") + to_string(isa) + ", effective ISA is "
                           + to_string(effective_cpu_isa());
                if (!vnni && isa == cpu_isa::avx512_core
                    && effective_cpu_isa() >= cpu_isa::avx512_core_vnni)
                    return "superseded by jit:avx512_core_vnni on this CPU";
                if (isa == cpu_isa::avx2 && effective_cpu_isa() >= cpu_isa::avx512_core)
                    return "superseded by the AVX-512 kernels on this CPU";
                const int64_t reduction = p.dir == direction::forward         ? p.in
                                          : p.dir == direction::backward_data ? p.out
                                                                              : p.batch;
                if (reduction > int32_safe_reduction_length)
                    return "a reduction of " + std::to_string(reduction) + " > "
                           + std::to_string(int32_safe_reduction_length)
                           + " terms could overflow int32";
                if (std::max(p.in, p.out) > (int64_t(1) << 31) / jit::tile_row_bytes)
                    return "a dimension exceeds the 32-bit tile offsets";
                return "";
            },
            [isa, vnni](const problem &p) -> std::shared_ptr<const kernel> {
                runtime::kernel_key key{
                        "linear_s8",           static_cast<int>(p.dir), {p.in, p.out},   1,
                        static_cast<int>(isa), p.num_threads,           p.pattern.hash()};
                return cached_plan(key, [&, isa]() -> std::shared_ptr<const kernel> {
                    if (p.dir == direction::backward_weights)
                        return std::make_shared<const jit_linear_s8_bwd_weights_kernel>(p, isa);
                    return std::make_shared<const jit_linear_s8_spmm_kernel>(p, isa);
                });
            }};
}

} // namespace

implementation jit_avx512_vnni_linear_s8_implementation() {
    return jit_linear_s8_implementation("jit:avx512_core_vnni", cpu_isa::avx512_core_vnni);
}

implementation jit_avx512_linear_s8_implementation() {
    return jit_linear_s8_implementation("jit:avx512_core", cpu_isa::avx512_core);
}

implementation jit_avx2_linear_s8_implementation() {
    return jit_linear_s8_implementation("jit:avx2", cpu_isa::avx2);
}

} // namespace qsp::detail
