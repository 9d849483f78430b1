// Sparse Linear in f32 on the JIT kernels ("jit:avx512_core", "jit:avx2"):
// the batch-innermost tile layout, nnz-balanced row partitions (no write
// ever collides: no barriers, no atomics, no private copies of dW), and the
// SpMM / SDDMM kernels of jit/. The per-layer plan (offsets, transposed
// pattern, partitions, kernels) is built once per problem and kept in the
// plan cache; every batch size shares it.
#include "primitives/sparse_jit/jit_linear_f32.hpp"

#include <algorithm>
#include <memory>

#include <omp.h>

#include "jit/jit_uni_sddmm_kernel.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "primitives/sparse_jit/jit_plan.hpp"
#include "primitives/sparse_jit/plan_cache.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"
#include "primitives/sparse_jit/spmm_runner.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

class jit_linear_f32_plan : public jit_plan {
public:
    jit_linear_f32_plan(const problem &p, cpu_isa isa, bool specialise)
        : jit_linear_f32_plan(
                p, isa, specialise,
                p.dir == direction::backward_data
                        ? transposed_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out, p.in)
                        : csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out)) {}

    jit_linear_f32_plan(const problem &p, cpu_isa isa, bool specialise, const sparse_rows &m)
        : jit_plan(p), lanes_(jit::vector_lanes(isa)), rows_(m, row_offset, p.num_threads) {
        if (p.dir == direction::backward_weights) {
            // One kernel per tail length (vectors of the last tile).
            for (int nv = 1; nv <= jit::tile_batch / lanes_; ++nv)
                sddmm_.push_back(jit::sddmm_kernel(
                        jit::make_sparse_kernel_params(isa, jit::sparse_dtype::f32, nv)));
            return;
        }
        // a source channel is one tile row: tile_row_bytes in L1 per pass
        spmm_ = std::make_unique<spmm_runner>(
                isa, jit::sparse_dtype::f32, rows_.bounds,
                make_source_groups(
                        m, rows_.row_ptr, nullptr, [](int64_t key) { return key; },
                        p.dir == direction::backward_data ? p.out : p.in, jit::tile_row_bytes, 4,
                        specialise ? linear_pattern_min_group_items : linear_min_group_items),
                specialise);
        const auto order = spmm_->take_item_order();
        if (!order.empty()) rows_.reorder_offsets(order);
    }

    std::string specialisation() const override {
        return spmm_ ? spmm_->specialisation() : std::string();
    }

private:
    // A source row of the tiles: one tile row per feature.
    static int64_t row_offset(int64_t, int64_t feature) { return feature * jit::tile_row_bytes; }

    void run_spmm(int64_t batch, const float *values, const float *src_tiles, int64_t src_channels,
                  float *dst_tiles) const {
        const auto timed = kernel_time(p_.dir);
        spmm_->run(batch, values, rows_.offsets.data(),
                   reinterpret_cast<const uint8_t *>(src_tiles), src_channels * jit::tile_row_bytes,
                   reinterpret_cast<uint8_t *>(dst_tiles), rows_.rows * jit::tile_row_bytes,
                   p_.num_threads);
    }

    // A plain batch x channels tensor packed into tiles in scratch slot `slot`.
    const float *packed(const float *plain, int64_t batch, int64_t channels,
                        runtime::scratchpad &sp, int slot) const {
        float *tiles = sp.get<float>(slot, tiled_elems(batch, channels));
        pack_tiles(plain, batch, channels, tiles, p_.num_threads);
        return tiles;
    }

    const char *forward(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        // Kept arguments are the tiles themselves: no pass on that side.
        const float *x = t.src_kept ? t.src : packed(t.src, t.batch, p_.in, sp, 0);
        float *y = t.dst_kept ? t.dst : sp.get<float>(1, tiled_elems(t.batch, p_.out));
        run_spmm(t.batch, t.weights, x, p_.in, y); // the CSR is the kernel order
        if (t.dst_kept)
            finish_kept_tiles(y, t.batch, p_.out, t.bias, nt);
        else
            unpack_tiles(y, t.batch, p_.out, t.bias, t.dst, nt, 1);
        return nullptr;
    }

    const char *backward_data(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        // In a fused backward the dY tiles go to memory that outlives this
        // direction: backward-weights takes them as they are.
        const float *dy = t.diff_dst; // kept: the tiles already, and they outlive the call
        if (!t.dst_kept) {
            float *tiles = t.shared ? t.shared->scratch.get<float>(0, tiled_elems(t.batch, p_.out))
                                    : sp.get<float>(0, tiled_elems(t.batch, p_.out));
            pack_tiles(t.diff_dst, t.batch, p_.out, tiles, nt);
            dy = tiles;
        }
        float *dx = t.src_kept ? t.diff_src : sp.get<float>(1, tiled_elems(t.batch, p_.in));
        const float *values =
                rows_.values(t.weights, sp.get<float>(2, p_.pattern.nnz()), nt); // transposed order
        if (t.shared) {
            t.shared->kind = shared_gradient::form::f32_tiles;
            t.shared->data = dy;
        }
        run_spmm(t.batch, values, dy, p_.out, dx);
        if (t.src_kept)
            finish_kept_tiles(dx, t.batch, p_.in, nullptr, nt);
        else
            unpack_tiles(dx, t.batch, p_.in, nullptr, t.diff_src, nt, 1);
        return nullptr;
    }

    const char *backward_weights(const tensors &t, runtime::scratchpad &sp) const override {
        const int nt = p_.num_threads;
        const float *x = t.src_kept ? t.src : packed(t.src, t.batch, p_.in, sp, 0);
        const float *dy = nullptr;
        if (t.shared && t.shared->kind == shared_gradient::form::f32_tiles)
            dy = static_cast<const float *>(t.shared->data); // packed by backward-data
        else
            dy = t.dst_kept ? t.diff_dst : packed(t.diff_dst, t.batch, p_.out, sp, 1);
        std::fill(t.diff_weights, t.diff_weights + p_.pattern.nnz(), 0.f);
        // Tiles inside parts: each dW row accumulates its tiles in order,
        // so the result does not depend on the thread count.
        const auto timed = kernel_time(p_.dir);
        for_parts_and_tiles(rows_.bounds, tile_count(t.batch), nt, [&](int part, int64_t tile) {
            jit::sddmm_call_params c{rows_.offsets.data(),
                                     rows_.row_ptr.data(),
                                     rows_.bounds[part],
                                     rows_.bounds[part + 1],
                                     x + tile * p_.in * jit::tile_batch,
                                     dy + tile * p_.out * jit::tile_batch,
                                     t.diff_weights};
            (*sddmm_[tile_vectors(t.batch, tile, lanes_) - 1])(c);
        });
        if (t.diff_bias) {
            // Rows of the dY tiles are contiguous: the bias gradient is a row sum.
            const int64_t tiles = tile_count(t.batch);
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t n = 0; n < p_.out; ++n) {
                // lane-wise partial sums (vectorised), then the lanes in order:
                // the lanes the packing wrote, the batch zero-padded
                float lane_sum[jit::tile_batch] = {};
                for (int64_t tile = 0; tile < tiles; ++tile) {
                    const float *row = dy + (tile * p_.out + n) * jit::tile_batch;
                    const int64_t lanes = tile_lanes(t.batch, tile);
#pragma omp simd
                    for (int64_t j = 0; j < lanes; ++j)
                        lane_sum[j] += row[j];
                }
                float acc = 0.f;
                for (float v : lane_sum)
                    acc += v;
                t.diff_bias[n] = acc;
            }
        }
        return nullptr;
    }

    size_t owned_code_bytes() const override {
        return spmm_ ? spmm_->pattern_code_bytes() : 0;
    }

    int lanes_;
    entry_plan rows_; // forward, backward-weights: the CSR; backward-data: its transpose
    std::unique_ptr<spmm_runner> spmm_; // SpMM directions
    std::vector<std::shared_ptr<const jit::jit_sddmm_kernel>> sddmm_;
};

} // namespace

implementation jit_linear_f32(cpu_isa isa, spmm_code code) {
    const bool specialise = code == spmm_code::pattern;
    const char *name = jit_implementation_name(isa, specialise ? "pattern" : nullptr);
    return {name,
            [isa, specialise](const problem &p) -> std::string {
                if (p.scheme != quant_scheme::f32) return "f32 only";
                std::string why = jit_tier_refusal(quant_scheme::f32, isa);
                if (!why.empty()) return why;
                if (std::max(p.in, p.out) > (int64_t(1) << 31) / jit::tile_row_bytes)
                    return "a dimension exceeds the 32-bit tile offsets";
                if (specialise) return why_not_pattern_specialised(p);
                return "";
            },
            [name, isa, specialise](const problem &p) -> std::shared_ptr<const kernel> {
                return cached_plan(name, isa, p, [&] {
                    return std::make_shared<const jit_linear_f32_plan>(p, isa, specialise);
                });
            },
            false,
            op_kind::linear,
            /*kept_layout_native=*/[](const problem &) { return true; }};
}

} // namespace qsp::detail
