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
#include "primitives/sparse_jit/plan_cache.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"
#include "primitives/sparse_jit/spmm_runner.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

class jit_linear_f32_plan : public kernel {
public:
    jit_linear_f32_plan(const problem &p, cpu_isa isa, bool specialise)
        : jit_linear_f32_plan(
                p, isa, specialise,
                p.dir == direction::backward_data
                        ? transposed_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out, p.in)
                        : csr_rows(p.pattern.row_ptr(), p.pattern.col_idx(), p.out)) {}

    jit_linear_f32_plan(const problem &p, cpu_isa isa, bool specialise, const sparse_rows &m)
        : p_(p.without_batch()), lanes_(jit::vector_lanes(isa)),
          rows_(m, row_offset, p.num_threads) {
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

    const char *execute(const tensors &t) const override {
        runtime::scratchpad sp;
        switch (p_.dir) {
            case direction::forward:
                forward(t, sp);
                break;
            case direction::backward_data:
                backward_data(t, sp);
                break;
            case direction::backward_weights:
                backward_weights(t, sp);
                break;
        }
        return nullptr;
    }

private:
    // A source row of the tiles: one tile row per feature.
    static int64_t row_offset(int64_t, int64_t feature) { return feature * jit::tile_row_bytes; }

    // Runs body(part, tile) for every (row part, batch tile), parts spread
    // over the team; a part's rows are written by one thread only.
    template <typename body_t> void for_parts(int64_t batch, body_t body) const {
        const auto timed = kernel_time(p_.dir);
        const int parts = static_cast<int>(rows_.bounds.size()) - 1;
        const int64_t tiles = tile_count(batch);
#pragma omp parallel num_threads(p_.num_threads)
        {
            const int nthr = omp_get_num_threads(), tid = omp_get_thread_num();
            for (int part = tid; part < parts; part += nthr)
                for (int64_t tile = 0; tile < tiles; ++tile)
                    body(part, tile);
        }
    }

    void run_spmm(int64_t batch, const float *values, const float *src_tiles, int64_t src_channels,
                  float *dst_tiles) const {
        const auto timed = kernel_time(p_.dir);
        spmm_->run(batch, values, rows_.offsets.data(),
                   reinterpret_cast<const uint8_t *>(src_tiles), src_channels * jit::tile_row_bytes,
                   reinterpret_cast<uint8_t *>(dst_tiles), rows_.rows * jit::tile_row_bytes,
                   p_.num_threads);
    }

    void forward(const tensors &t, runtime::scratchpad &sp) const {
        const int nt = p_.num_threads;
        float *x = sp.get<float>(0, tiled_elems(t.batch, p_.in));
        float *y = sp.get<float>(1, tiled_elems(t.batch, p_.out));
        pack_tiles(t.src, t.batch, p_.in, x, nt);
        run_spmm(t.batch, t.weights, x, p_.in, y); // the CSR is the kernel order
        unpack_tiles(y, t.batch, p_.out, t.bias, t.dst, nt);
    }

    void backward_data(const tensors &t, runtime::scratchpad &sp) const {
        const int nt = p_.num_threads;
        // In a fused backward the dY tiles go to memory that outlives this
        // direction: backward-weights takes them as they are.
        float *dy = t.shared ? t.shared->scratch.get<float>(0, tiled_elems(t.batch, p_.out))
                             : sp.get<float>(0, tiled_elems(t.batch, p_.out));
        float *dx = sp.get<float>(1, tiled_elems(t.batch, p_.in));
        const float *values =
                rows_.values(t.weights, sp.get<float>(2, p_.pattern.nnz()), nt); // transposed order
        pack_tiles(t.diff_dst, t.batch, p_.out, dy, nt);
        if (t.shared) {
            t.shared->kind = shared_gradient::form::f32_tiles;
            t.shared->data = dy;
        }
        run_spmm(t.batch, values, dy, p_.out, dx);
        unpack_tiles(dx, t.batch, p_.in, nullptr, t.diff_src, nt);
    }

    void backward_weights(const tensors &t, runtime::scratchpad &sp) const {
        const int nt = p_.num_threads;
        float *x = sp.get<float>(0, tiled_elems(t.batch, p_.in));
        pack_tiles(t.src, t.batch, p_.in, x, nt);
        const float *dy = nullptr;
        if (t.shared && t.shared->kind == shared_gradient::form::f32_tiles) {
            dy = static_cast<const float *>(t.shared->data); // packed by backward-data
        } else {
            float *packed = sp.get<float>(1, tiled_elems(t.batch, p_.out));
            pack_tiles(t.diff_dst, t.batch, p_.out, packed, nt);
            dy = packed;
        }
        std::fill(t.diff_weights, t.diff_weights + p_.pattern.nnz(), 0.f);
        // Tiles inside parts: each dW row accumulates its tiles in order,
        // so the result does not depend on the thread count.
        for_parts(t.batch, [&](int part, int64_t tile) {
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
                float acc = 0.f;
                for (int64_t tile = 0; tile < tiles; ++tile) {
                    // the lanes the packing wrote: the batch, zero-padded
                    const float *row = dy + (tile * p_.out + n) * jit::tile_batch;
                    for (int64_t j = 0; j < tile_lanes(t.batch, tile); ++j)
                        acc += row[j];
                }
                t.diff_bias[n] = acc;
            }
        }
    }

    problem p_; // batch 0: the plan serves every batch size
    int lanes_;
    entry_plan rows_; // forward, backward-weights: the CSR; backward-data: its transpose
    std::unique_ptr<spmm_runner> spmm_; // SpMM directions
    std::vector<std::shared_ptr<const jit::jit_sddmm_kernel>> sddmm_;
};

implementation jit_linear_f32_implementation(const char *name, cpu_isa isa, bool specialise) {
    return {name,
            [isa, specialise](const problem &p) -> std::string {
                if (p.op != op_kind::linear)
                    return "Linear only (Conv2d has implementations of its own)";
                if (p.scheme != quant_scheme::f32)
                    return "f32 only (s8 has implementations of its own)";
                if (effective_cpu_isa() < isa)
                    return std::string("needs ") + to_string(isa) + ", effective ISA is "
                           + to_string(effective_cpu_isa());
                if (isa == cpu_isa::avx2 && effective_cpu_isa() >= cpu_isa::avx512_core)
                    return "superseded by jit:avx512_core on this CPU";
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
            false, op_kind::linear};
}

} // namespace

implementation jit_avx512_linear_f32_implementation() {
    return jit_linear_f32_implementation("jit:avx512_core", cpu_isa::avx512_core, false);
}

implementation jit_avx2_linear_f32_implementation() {
    return jit_linear_f32_implementation("jit:avx2", cpu_isa::avx2, false);
}

implementation jit_avx512_pattern_linear_f32_implementation() {
    return jit_linear_f32_implementation("jit:avx512_core:pattern", cpu_isa::avx512_core, true);
}

implementation jit_avx2_pattern_linear_f32_implementation() {
    return jit_linear_f32_implementation("jit:avx2:pattern", cpu_isa::avx2, true);
}

} // namespace qsp::detail
