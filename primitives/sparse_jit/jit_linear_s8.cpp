// "jit:avx512_core_vnni" for sparse Linear in s8, on vpdpbusd (u8 x s8,
// 4 multiply-adds per 32-bit lane), and "jit:avx512_core", the same kernels
// with vpdpbusd emulated exactly on AVX-512BW (jit/jit_int8_dot.hpp). The unsigned operand is
// always stored shifted by +128 and the exact term 128 * sum(other operand) subtracted afterwards
// (no sign tricks: the peer's is wrong at -128). Sums are exact int32 (255 * 127 * length < 2^31
// for lengths <= 65536), so every result equals the reference bit for bit.
//
//   forward        SpMM over "k-quads": one vpdpbusd per 16
//                  batch elements per non-empty quad of 4 columns of a row;
//                  on avx2 without AVX-VNNI over "k-pairs" of u16 instead,
//                  one vpmaddwd per 8 batch elements per non-empty pair.
//   backward-data  the same over the transposed pattern (quads of rows).
//   backward-weights SDDMM: one vpdpbusd per nonzero per 64
//                  batch elements, 16 nonzeros reduced together.
#include "primitives/sparse_jit/jit_linear_s8.hpp"

#include <algorithm>
#include <memory>

#include <omp.h>

#include "jit/jit_uni_sddmm_kernel.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "primitives/passes/bias_grad.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "primitives/sparse_jit/jit_plan.hpp"
#include "primitives/sparse_jit/plan_cache.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"
#include "primitives/sparse_jit/spmm_runner.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

// Forward (rows = output features, quads over input features) and
// backward-data (rows = input features, quads over output features).
class jit_linear_s8_spmm_plan : public jit_plan {
public:
    jit_linear_s8_spmm_plan(const problem &p, cpu_isa isa, bool specialise)
        : jit_linear_s8_spmm_plan(
                p, isa, specialise,
                p.dir == direction::forward
                        ? csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out)
                        : transposed_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out, p.in)) {}

    jit_linear_s8_spmm_plan(const problem &p, cpu_isa isa, bool specialise, const sparse_rows &m)
        : jit_plan(p), word_(jit::s8_spmm_word(isa)),
          quads_(m, word_offset, p.num_threads, jit::channels_per_word(word_)),
          // a word tile row (tile_row_bytes) holds 4 (2) source channels
          spmm_(isa, jit::sparse_dtype::s8, quads_.bounds,
                make_source_groups(
                        m, quads_.quad_ptr, &quads_.quad_of, [](int64_t key) { return key; },
                        p.dir == direction::forward ? p.in : p.out,
                        jit::tile_row_bytes / quads_.channels_per_word, quads_.channels_per_word,
                        specialise ? linear_pattern_min_group_items : linear_min_group_items),
                specialise, word_) {
        const auto order = spmm_.take_item_order();
        if (!order.empty()) quads_.reorder_offsets(order);
    }

    std::string specialisation() const override { return spmm_.specialisation(); }

private:
    // Forward and backward-data are one SpMM (the plan was built for one).
    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        return spmm(t, sp);
    }
    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        return spmm(t, sp);
    }

    const char *spmm(const tensors &t, runtime::scratchpad &sp) const {
        const int nt = p_.num_threads;
        const bool fwd = p_.dir == direction::forward;
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t src_ch = fwd ? K : N, tiles = tile_count(B), tb = jit::tile_batch;
        const int64_t cpw = quads_.channels_per_word;
        const int64_t quads = (src_ch + cpw - 1) / cpw, entries = quads_.quads(),
                      rows = quads_.rows;
        auto *pack = word_ == jit::s8_word::pair ? pack_pair_tiles : pack_quad_tiles;
        auto *words = sp.get<uint32_t>(2, entries);
        auto *correction = sp.get<int32_t>(3, rows);
        auto *src_q = sp.get<int8_t>(4, B * src_ch);
        auto *src_tiles = sp.get<uint8_t>(5, tiles * quads * tb * 4);
        auto *acc = sp.get<int32_t>(6, tiles * rows * tb);
        auto *row_scale = sp.get<float>(7, rows);
        // The forward quantizes this step's weights (into the workspace when
        // training); backward-data reads the forward's copy.
        const s8::workspace_view &ws = t.workspace;
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, N);
        if (fwd) quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        quads_.fill(wq, words, correction, nt);
        if (fwd) {
            int8_t *xq = t.workspace ? ws.src_q() : src_q;
            const float sx = quantize_rne(t.src, B * K, xq, nt);
            if (t.workspace) ws.set_src_scale(sx);
            pack(xq, B, K, src_tiles, nt);
            for (int64_t n = 0; n < N; ++n)
                row_scale[n] = s8::forward_scale(sx, w_scale[n]);
        } else {
            const float sg2 = quantize_stochastic(t.diff_dst, B * N, w_scale, N, 1,
                                                  s8::dx_stream(t.seed), src_q, nt);
            pack(src_q, B, N, src_tiles, nt);
            std::fill(row_scale, row_scale + rows, sg2);
        }
        {
            const auto timed = kernel_time(p_.dir);
            spmm_.run(B, words, quads_.offsets.data(), src_tiles, quads * tb * 4,
                      reinterpret_cast<uint8_t *>(acc), rows * tb * 4, nt);
        }
        unpack_s32_tiles(acc, B, rows, correction, row_scale, fwd ? t.bias : nullptr,
                         fwd ? t.dst : t.diff_src, nt, 1);
        return nullptr;
    }

    // A word's source row: one tile row per 4 (2) features.
    static int64_t word_offset(int64_t, int64_t word) { return word * jit::tile_row_bytes; }

    size_t owned_code_bytes() const override { return spmm_.pattern_code_bytes(); }

    jit::s8_word word_; // quads, or pairs on avx2 without AVX-VNNI
    quad_plan quads_;   // forward: the CSR; backward-data: its transpose
    spmm_runner spmm_;  // over quads, source channels in groups
};

// Forward and backward-data on avx2 without AVX-VNNI in the generic kernels:
// SpMM over entry pairs of plain s8 tiles (jit::s8_word::entry_pair), the
// rows of 64 bytes a quarter of f32's, so the source tile of a layer like
// L1 (768 channels, 48 KiB) nearly fits L1 where f32's (192 KiB) does not.
class jit_linear_s8_entry_pair_plan : public jit_plan {
public:
    jit_linear_s8_entry_pair_plan(const problem &p, cpu_isa isa, bool specialise)
        : jit_linear_s8_entry_pair_plan(
                p, isa, specialise,
                p.dir == direction::forward
                        ? csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out)
                        : transposed_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out, p.in)) {}

    jit_linear_s8_entry_pair_plan(const problem &p, cpu_isa isa, bool specialise,
                                  const sparse_rows &m)
        : jit_plan(p), pairs_(
                               m, [](int64_t, int64_t key) { return key * jit::s8_tile_row_bytes; },
                               p.dir == direction::forward ? p.in : p.out, jit::s8_tile_row_bytes,
                               specialise ? linear_pattern_min_group_items : linear_min_group_items,
                               p.num_threads),
          spmm_(isa, jit::sparse_dtype::s8, pairs_.bounds,
                source_groups{pairs_.n_groups, pairs_.group_size, pairs_.group_ptr}, specialise,
                jit::s8_word::entry_pair) {
        const auto order = spmm_.take_item_order();
        if (!order.empty()) pairs_.reorder_offsets(order);
    }

    std::string specialisation() const override { return spmm_.specialisation(); }

private:
    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        return spmm(t, sp);
    }
    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        return spmm(t, sp);
    }

    const char *spmm(const tensors &t, runtime::scratchpad &sp) const {
        const int nt = p_.num_threads;
        const bool fwd = p_.dir == direction::forward;
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t src_ch = fwd ? K : N, tiles = tile_count(B), tb = jit::tile_batch;
        const int64_t rows = pairs_.rows;
        auto *words = sp.get<uint32_t>(2, pairs_.items());
        auto *no_correction = sp.get<int32_t>(3, rows); // plain s8 sources: nothing to remove
        auto *src_q = sp.get<int8_t>(4, B * src_ch);
        auto *src_tiles = sp.get<int8_t>(5, tiles * src_ch * tb);
        auto *acc = sp.get<int32_t>(6, tiles * rows * tb);
        auto *row_scale = sp.get<float>(7, rows);
        const s8::workspace_view &ws = t.workspace;
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, N);
        if (fwd) quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        pairs_.fill(wq, words, nt);
        std::fill(no_correction, no_correction + rows, 0);
        if (fwd) {
            int8_t *xq = t.workspace ? ws.src_q() : src_q;
            const float sx = quantize_rne(t.src, B * K, xq, nt);
            if (t.workspace) ws.set_src_scale(sx);
            pack_s8_tiles(xq, B, K, src_tiles, nt);
            for (int64_t n = 0; n < N; ++n)
                row_scale[n] = s8::forward_scale(sx, w_scale[n]);
        } else {
            const float sg2 = quantize_stochastic(t.diff_dst, B * N, w_scale, N, 1,
                                                  s8::dx_stream(t.seed), src_q, nt);
            pack_s8_tiles(src_q, B, N, src_tiles, nt);
            std::fill(row_scale, row_scale + rows, sg2);
        }
        {
            const auto timed = kernel_time(p_.dir);
            spmm_.run(B, words, pairs_.offsets.data(), reinterpret_cast<const uint8_t *>(src_tiles),
                      src_ch * tb, reinterpret_cast<uint8_t *>(acc), rows * tb * 4, nt);
        }
        unpack_s32_tiles(acc, B, rows, no_correction, row_scale, fwd ? t.bias : nullptr,
                         fwd ? t.dst : t.diff_src, nt, 1);
        return nullptr;
    }

    size_t owned_code_bytes() const override { return spmm_.pattern_code_bytes(); }

    entry_pair_plan pairs_; // forward: the CSR; backward-data: its transpose
    spmm_runner spmm_;
};

class jit_linear_s8_bwd_weights_plan : public jit_plan {
public:
    jit_linear_s8_bwd_weights_plan(const problem &p, cpu_isa isa)
        : jit_plan(p),
          entries_(
                  csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out),
                  [](int64_t, int64_t k) { return k * jit::s8_tile_row_bytes; }, p.num_threads),
          code_(jit::sddmm_kernel(jit::make_sparse_kernel_params(isa, jit::sparse_dtype::s8, 1))) {}

private:
    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t tiles = tile_count(B), tb = jit::tile_batch;
        const s8::workspace_view &ws = t.workspace;
        const float sx = ws.src_scale();
        const int8_t *xq = ws.src_q();
        auto *g_tiles = sp.get<uint8_t>(0, tiles * N * tb);
        auto *x_tiles = sp.get<int8_t>(1, tiles * K * tb);
        auto *col_sum = sp.get<int32_t>(2, K);
        auto *acc = sp.get<int32_t>(3, nnz);
        const float sg1 = quantize_stochastic_to_s8_tiles(t.diff_dst, B, N, s8::dw_stream(t.seed),
                                                          g_tiles, nt);
        pack_s8_tiles(xq, B, K, x_tiles, nt);
        column_sums_s8(xq, B, K, col_sum, nt);
        std::fill(acc, acc + nnz, 0);
        {
            const auto timed = kernel_time(p_.dir);
            for_parts_and_tiles(entries_.bounds, tiles, nt, [&](int part, int64_t tile) {
                jit::sddmm_call_params c{entries_.offsets.data(),
                                         entries_.row_ptr.data(),
                                         entries_.bounds[part],
                                         entries_.bounds[part + 1],
                                         x_tiles + tile * K * tb,
                                         g_tiles + tile * N * tb,
                                         acc,
                                         jit::s8_tile_row_bytes};
                (*code_)(c);
            });
        }
        const float scale = s8::backward_weights_scale(sg1, sx);
        const int64_t *rp = p_.pattern.row_ptr();
        const int32_t *ci = p_.pattern.col_idx();
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t n = 0; n < N; ++n)
            for (int64_t e = rp[n]; e < rp[n + 1]; ++e)
                t.diff_weights[e] = static_cast<float>(acc[e] - 128 * col_sum[ci[e]]) * scale;
        if (t.diff_bias) bias_grad(t.diff_dst, t.diff_bias, B, N, 1, nt);
        return nullptr;
    }

    entry_plan entries_;
    std::shared_ptr<const jit::jit_sddmm_kernel> code_;
};

} // namespace

implementation jit_linear_s8(cpu_isa isa, spmm_code code) {
    const bool specialise = code == spmm_code::pattern;
    const char *name = jit_implementation_name(isa, specialise ? "pattern" : nullptr);
    return {name,
            [isa, specialise](const problem &p) -> std::string {
                if (p.scheme != quant_scheme::s8) return "s8 only";
                std::string why = jit_tier_refusal(quant_scheme::s8, isa);
                if (!why.empty()) return why;
                const int64_t reduction = p.dir == direction::forward         ? p.in
                                          : p.dir == direction::backward_data ? p.out
                                                                              : p.batch;
                if (reduction > int32_safe_reduction_length)
                    return "a reduction of " + std::to_string(reduction) + " > "
                           + std::to_string(int32_safe_reduction_length)
                           + " terms could overflow int32";
                if (std::max(p.in, p.out) > (int64_t(1) << 31) / jit::tile_row_bytes)
                    return "a dimension exceeds the 32-bit tile offsets";
                if (specialise) return why_not_pattern_specialised(p);
                return "";
            },
            [name, isa, specialise](const problem &p) -> std::shared_ptr<const kernel> {
                return cached_plan(name, isa, p, [&]() -> std::shared_ptr<const kernel> {
                    if (p.dir == direction::backward_weights)
                        return std::make_shared<const jit_linear_s8_bwd_weights_plan>(p, isa);
                    if (jit::s8_spmm_word(isa) == jit::s8_word::pair)
                        return std::make_shared<const jit_linear_s8_entry_pair_plan>(p, isa,
                                                                                     specialise);
                    return std::make_shared<const jit_linear_s8_spmm_plan>(p, isa, specialise);
                });
            },
            false, op_kind::linear};
}

} // namespace qsp::detail
