// "jit:avx512_core_vnni" for sparse Linear in s8, on vpdpbusd (u8 x s8,
// 4 multiply-adds per 32-bit lane), and "jit:avx512_core" (AVX-512 without VNNI), the same
// plans over the int16 products of AVX2 without AVX-VNNI below. With vpdpbusd the unsigned
// operand is stored shifted by +128 and the exact term 128 * sum(other operand) subtracted
// afterwards (no sign tricks: the peer's is wrong at -128; ours take signs only from operands
// in [-127, 127]). Sums are exact int32 (255 * 127 * length < 2^31
// for lengths <= 65536), so every result equals the reference bit for bit.
//
//   forward        SpMM over "k-quads": one vpdpbusd per 16
//                  batch elements per non-empty quad of 4 columns of a row;
//                  without VNNI (avx2 without AVX-VNNI, avx512_core) over
//                  entry pairs instead (two nonzeros of a row per item, s8
//                  rows interleaved and multiplied in int16 by vpsignb or a
//                  masked negation + vpmaddubsw; no +128 shift).
//   backward-data  the same over the transposed pattern (quads of rows).
//   backward-weights SDDMM: one vpdpbusd per nonzero per 64
//                  batch elements, 16 nonzeros reduced together (without
//                  VNNI G itself in int16: no correction).
#include "primitives/sparse_jit/jit_linear_s8.hpp"

#include <algorithm>
#include <memory>
#include <type_traits>

#include <omp.h>

#include "jit/jit_uni_sddmm_kernel.hpp"
#include "primitives/core/kept_layout.hpp"
#include "primitives/core/s8_dy_quantization.hpp"
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

// Forward (rows = output features, items over input features) and
// backward-data (rows = input features, items over output features), over
// k-quads (quad_plan: vpdpbusd) or, without VNNI (jit::s8_tile_word), entry
// pairs (entry_pair_plan: plain s8 tiles, 64-byte rows a quarter of f32's,
// so L1's source tile of 768 channels is 48 KiB).
template <typename items_t> class jit_linear_s8_spmm_plan : public jit_plan {
    static constexpr bool entry_pairs = std::is_same_v<items_t, entry_pair_plan>;

public:
    jit_linear_s8_spmm_plan(const problem &p, cpu_isa isa, bool specialise)
        : jit_linear_s8_spmm_plan(
                p, isa, specialise,
                p.dir == direction::forward
                        ? csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out)
                        : transposed_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out, p.in)) {}

    jit_linear_s8_spmm_plan(const problem &p, cpu_isa isa, bool specialise, const sparse_rows &m)
        : jit_plan(p), items_(make_items(p, m, specialise)),
          spmm_(isa, jit::sparse_dtype::s8, items_.bounds, groups(p, m, specialise), specialise,
                entry_pairs ? jit::s8_word::entry_pair : jit::s8_word::quad) {
        const auto order = spmm_.take_item_order();
        if (!order.empty()) items_.reorder_offsets(order);
    }

    std::string specialisation() const override { return spmm_.specialisation(); }

private:
    static int64_t source_channels(const problem &p) {
        return p.dir == direction::forward ? p.in : p.out;
    }
    static int64_t min_group_items(bool specialise) {
        return specialise ? linear_pattern_min_group_items : linear_min_group_items;
    }
    static items_t make_items(const problem &p, const sparse_rows &m, bool specialise) {
        if constexpr (entry_pairs)
            return entry_pair_plan(
                    m, [](int64_t, int64_t key) { return key * jit::s8_tile_row_bytes; },
                    source_channels(p), jit::s8_tile_row_bytes, min_group_items(specialise),
                    p.num_threads);
        else // a quad tile row (tile_row_bytes) holds 4 source channels
            return quad_plan(
                    m, [](int64_t, int64_t quad) { return quad * jit::tile_row_bytes; },
                    p.num_threads);
    }
    // The runner's source groups (an entry pair plan's are handed over: they
    // are not read after the runner is built).
    source_groups groups(const problem &p, const sparse_rows &m, bool specialise) {
        if constexpr (entry_pairs)
            return std::move(items_.groups);
        else {
            const std::vector<int64_t> item_of = items_.item_of();
            return make_source_groups(
                    m, items_.quad_ptr, &item_of, [](int64_t key) { return key; },
                    source_channels(p), jit::tile_row_bytes / 4, 4, min_group_items(specialise));
        }
    }

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
        // The side the direction reads (forward: src; backward-data: dY) and
        // the one it writes, each plain or in the kept layout.
        const bool in_kept = fwd ? t.src_kept : t.dst_kept,
                   out_kept = fwd ? t.dst_kept : t.src_kept;
        const kept_s8_passes *kept = nullptr;
        if (in_kept || out_kept) {
            if constexpr (entry_pairs) kept = kept_s8_passes_tier();
            if (!kept) // quads read their own words; or capped below AVX2 since the pick
                return run_on_plain_layout(p_, t, t.src_kept, t.dst_kept,
                                           [&](const tensors &plain) { return spmm(plain, sp); });
        }
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t src_ch = source_channels(p_), tiles = tile_count(B), tb = jit::tile_batch;
        const int64_t rows = items_.rows;
        // entry pairs: s8 tile rows of tb bytes; quads: a dword per element of 4 channels
        const int64_t src_tile_bytes = entry_pairs ? src_ch * tb : (src_ch + 3) / 4 * tb * 4;
        int64_t n_items = 0;
        if constexpr (entry_pairs)
            n_items = items_.items();
        else
            n_items = items_.quads();
        auto *words = sp.get<uint32_t>(2, n_items);
        auto *correction = sp.get<int32_t>(3, rows);
        auto *src_q = in_kept ? nullptr : sp.get<int8_t>(4, B * src_ch);
        auto *src_tiles = sp.get<uint8_t>(5, tiles * src_tile_bytes);
        // kept: the sums go straight to the output's memory (tiles of the
        // same shape), then become its floats in place
        auto *acc = out_kept ? reinterpret_cast<int32_t *>(fwd ? t.dst : t.diff_src)
                             : sp.get<int32_t>(6, tiles * rows * tb);
        auto *row_scale = sp.get<float>(7, rows);
        // The forward quantizes this step's weights (into the workspace when
        // training); backward-data reads the forward's copy.
        const s8::workspace_view &ws = t.workspace;
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, N);
        if (fwd) quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        auto pack = [&](const int8_t *q) {
            if constexpr (entry_pairs) {
                items_.fill(wq, words, nt);
                std::fill(correction, correction + rows, 0); // plain s8 sources: no shift
                if (q)
                    pack_s8_tiles(q, B, src_ch, reinterpret_cast<int8_t *>(src_tiles), nullptr, nt);
            } else {
                // backward-data's values in the transpose's order: gathered
                int8_t *gathered = items_.value_index.in_order()
                                           ? nullptr
                                           : sp.get<int8_t>(8, items_.entries());
                items_.fill(wq, words, correction, nt, gathered);
                pack_quad_tiles(q, B, src_ch, src_tiles, nt);
            }
        };
        if (fwd) {
            float sx = 0.f;
            if (in_kept) {
                // the kept tiles quantized element by element are the
                // kernel's s8 tiles; training keeps them as Xq for
                // backward-weights (which then packs nothing)
                int8_t *xq = t.workspace ? ws.src_q() : reinterpret_cast<int8_t *>(src_tiles);
                sx = quantize_rne(t.src, tiled_elems(B, K), xq, t.src_abs_max, nt);
                if (t.workspace) ws.set_src_scale(sx, s8::src_q_form::tiles);
                src_tiles = reinterpret_cast<uint8_t *>(xq);
                pack(nullptr);
            } else {
                int8_t *xq = t.workspace ? ws.src_q() : src_q;
                sx = quantize_rne(t.src, B * K, xq, t.src_abs_max, nt);
                if (t.workspace) ws.set_src_scale(sx);
                pack(xq);
            }
            for (int64_t n = 0; n < N; ++n)
                row_scale[n] = s8::forward_scale(sx, w_scale[n]);
        } else {
            float sg2 = 0.f;
            if (in_kept) {
                sg2 = kept_dx_gradient(t, *kept, w_scale, reinterpret_cast<int8_t *>(src_tiles));
                pack(nullptr);
            } else {
                sg2 = s8::quantize_dx_gradient(t, B * N, w_scale, N, 1, src_q, nt);
                pack(src_q);
            }
            std::fill(row_scale, row_scale + rows, sg2);
        }
        {
            const auto timed = kernel_time(p_.dir);
            spmm_.run(B, words, items_.offsets.data(), src_tiles, src_tile_bytes,
                      reinterpret_cast<uint8_t *>(acc), rows * tb * 4, nt);
        }
        const float *bias = fwd ? t.bias : nullptr;
        if (out_kept)
            kept->dequantize(acc, B, rows, correction, row_scale, bias,
                             reinterpret_cast<float *>(acc), nt);
        else
            unpack_s32_tiles(acc, B, rows, correction, row_scale, bias, fwd ? t.dst : t.diff_src,
                             nt, 1);
        return nullptr;
    }

    // G2 of a kept dY into the s8 tiles g2, and G1 alongside (as the SDDMM's
    // u8 tiles) when the fused backward's backward-weights reads it; sg2.
    // Linear's dY is never a BatchNorm's backward, and its channel maxima,
    // where handed over, are those the pass finds.
    float kept_dx_gradient(const tensors &t, const kept_s8_passes &kept, const float *w_scale,
                           int8_t *g2) const {
        const int64_t B = t.batch, N = p_.out;
        shared_gradient *shared = t.shared;
        const bool g1_wanted = shared && shared->wanted == shared_gradient::form::s8_plain_dy_q;
        uint8_t *g1 = g1_wanted ? shared->scratch.get<uint8_t>(0, tiled_elems(B, N)) : nullptr;
        const stochastic_scales s =
                kept.stochastic(t.diff_dst, B, N, w_scale, s8::dx_stream(t.seed), g2,
                                s8::dw_stream(t.seed), g1, p_.num_threads);
        if (g1) {
            shared->kind = shared_gradient::form::s8_g1_tiles;
            shared->data = g1;
            shared->scale = s.plain;
        }
        return s.scaled;
    }

    size_t owned_code_bytes() const override { return spmm_.pattern_code_bytes(); }

    items_t items_;    // forward: the CSR; backward-data: its transpose
    spmm_runner spmm_; // over the items, source channels in groups
};

class jit_linear_s8_bwd_weights_plan : public jit_plan {
public:
    jit_linear_s8_bwd_weights_plan(const problem &p, cpu_isa isa)
        : jit_plan(p),
          entries_(
                  csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out),
                  [](int64_t, int64_t k) { return k * jit::s8_tile_row_bytes; }, p.num_threads),
          code_(jit::sddmm_kernel(jit::make_sparse_kernel_params(isa, jit::sparse_dtype::s8, 1))) {}

    // G1 as plain int8, from backward-data's pass over dY in a fused backward.
    shared_gradient::form shared_form_read() const override {
        return shared_gradient::form::s8_plain_dy_q;
    }

private:
    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const int64_t B = t.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        const int64_t tiles = tile_count(B), tb = jit::tile_batch;
        const bool g1_shared_tiles =
                t.shared && t.shared->kind == shared_gradient::form::s8_g1_tiles;
        const kept_s8_passes *kept = t.dst_kept ? kept_s8_passes_tier() : nullptr;
        if (t.dst_kept && !kept && !g1_shared_tiles) // capped below AVX2 since the pick
            return run_on_plain_layout(p_, t, t.src_kept, t.dst_kept, [&](const tensors &plain) {
                return backward_weights(plain, sp);
            });
        const s8::workspace_view &ws = t.workspace;
        const float sx = ws.src_scale();
        auto *g_tiles = sp.get<uint8_t>(0, tiles * N * tb);
        // X's column sums, for the shift the kernel's sums hold of G + 128
        // (none: not taken)
        const int32_t dy_shift = jit::sddmm_dy_shift(code_->params());
        auto *col_sum = dy_shift ? sp.get<int32_t>(2, K) : nullptr;
        auto *acc = sp.get<int32_t>(3, nnz);
        float sg1 = 0.f;
        if (g1_shared_tiles) { // made by backward-data's pass over the kept dY
            g_tiles = static_cast<uint8_t *>(const_cast<void *>(t.shared->data));
            sg1 = t.shared->scale;
        } else if (kept && !(t.shared && t.shared->kind == shared_gradient::form::s8_plain_dy_q)) {
            sg1 = kept->stochastic_g1(t.diff_dst, B, N, s8::dw_stream(t.seed), g_tiles, nt);
        } else {
            sg1 = s8::dw_gradient_tiles(t, B, N, N, g_tiles, nt);
        }
        // Xq: the kept layout's tiles as the forward left them, else packed
        const int8_t *x_tiles = nullptr;
        if (ws.src_form() == s8::src_q_form::tiles) {
            x_tiles = ws.src_q();
            if (col_sum) tile_column_sums(x_tiles, B, K, col_sum, nt);
        } else {
            auto *packed = sp.get<int8_t>(1, tiles * K * tb);
            pack_s8_tiles(ws.src_q(), B, K, packed, col_sum, nt);
            x_tiles = packed;
        }
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
                t.diff_weights[e] =
                        static_cast<float>(acc[e] - (col_sum ? dy_shift * col_sum[ci[e]] : 0))
                        * scale;
        if (t.diff_bias) {
            if (t.dst_kept)
                bias_grad_kept(t.diff_dst, t.diff_bias, B, N, nt);
            else
                bias_grad(t.diff_dst, t.diff_bias, B, N, 1, nt);
        }
        return nullptr;
    }

    // Column sums of Xq from its kept tiles (the padding lanes are 0).
    static void tile_column_sums(const int8_t *x_tiles, int64_t batch, int64_t channels,
                                 int32_t *sums, int num_threads) {
        const int64_t tiles = tile_count(batch), tb = jit::tile_batch;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t k = 0; k < channels; ++k) {
            int32_t sum = 0;
            for (int64_t tile = 0; tile < tiles; ++tile)
                for (int64_t j = 0; j < tb; ++j)
                    sum += x_tiles[(tile * channels + k) * tb + j];
            sums[k] = sum;
        }
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
                    if (jit::s8_tile_word(isa) != jit::s8_word::quad)
                        return std::make_shared<const jit_linear_s8_spmm_plan<entry_pair_plan>>(
                                p, isa, specialise);
                    return std::make_shared<const jit_linear_s8_spmm_plan<quad_plan>>(p, isa,
                                                                                      specialise);
                });
            },
            false, op_kind::linear,
            // entry pairs read s8 tiles, the kept layout's order; quads convert
            /*kept_layout_native=*/
            [isa](const problem &) { return jit::s8_tile_word(isa) != jit::s8_word::quad; }};
}

} // namespace qsp::detail
