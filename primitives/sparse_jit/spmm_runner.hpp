// How a Linear plan runs its SpMM (forward, backward-data; f32 or s8 quads)
// over every (row part, batch tile): the shared generic kernels
// (jit_uni_spmm_kernel.hpp), or code generated for this layer's pattern
// (jit_uni_spmm_pattern_kernel.hpp) with its schedule. The plans are the
// same otherwise, so the two are rival implementations the tuner measures
// per layer and direction.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "jit/jit_uni_spmm_kernel.hpp"
#include "jit/jit_uni_spmm_pattern_kernel.hpp"
#include "primitives/core/problem.hpp"
#include "primitives/sparse_jit/spmm_plan.hpp"

namespace qsp::detail {

// The rows of every (part, group) sorted by their segment length and cut
// into buckets of equal length (jit/tile_abi.hpp, spmm_schedule_call_params).
// The kernel reads a row's source offsets from consecutive slots, in
// schedule order: order[slot] is the plan's item (the plan permutes its
// offsets so; read in plan order, a sorted schedule would jump through them
// where the hardware prefetchers cannot follow). Values stay in plan order
// (the caller's weights, no copy per call): the kernel prefetches them.
struct spmm_schedule {
    // per scheduled row: {first slot, first item, destination byte offset, 0}
    std::vector<int32_t> rows;
    std::vector<int64_t> order;   // per slot: the item
    std::vector<int32_t> buckets; // {length, rows} per bucket
    // per (part, group) p * n_groups + g: where its rows and buckets start
    // (in records and pairs), then the end
    std::vector<int64_t> row_at, bucket_at;
    std::vector<int64_t> lengths; // the segment lengths that occur (>= 1), ascending
    // bounds: the parts' rows; groups.ptr: each row's items per source group.
    spmm_schedule(const std::vector<int64_t> &bounds, const source_groups &groups,
                  int64_t dst_row_bytes);
};

// Linear's SpMM groups for the generic kernels (spmm_plan.hpp) and for the
// specialised code, whose segments cost no loop exit: smaller groups pay.
constexpr int64_t linear_pattern_min_group_items = 8;

// Empty when the pattern-specialised SpMM can run p, else why not
// (backward-weights runs the SDDMM; the schedule indexes items in 32 bits).
std::string why_not_pattern_specialised(const problem &p);

class spmm_runner {
public:
    // bounds: the plan's parts; groups: each row's kernel items per source
    // group; specialise: generate the layer's code; word: how the s8 source
    // rows hold their channels (quads or pairs).
    spmm_runner(cpu_isa isa, jit::sparse_dtype dtype, const std::vector<int64_t> &bounds,
                source_groups groups, bool specialise, jit::s8_word word = jit::s8_word::quad);

    // dst tile t (at dst + t * dst_tile_bytes) = the SpMM of src tile t, for
    // every tile of the batch, on num_threads threads.
    void run(int64_t batch, const void *values, const int32_t *offsets, const uint8_t *src,
             int64_t src_tile_bytes, uint8_t *dst, int64_t dst_tile_bytes, int num_threads) const;

    // The order in which the specialised code reads source offsets
    // (spmm_schedule::order), handed over once (the plan stores its offsets
    // so before calling run(), and 8 bytes per entry need not stay); empty
    // for the generic kernels. Values stay in the plan's order.
    std::vector<int64_t> take_item_order();

    // What was specialised (verbose, tests): groups, exact bodies, code
    // bytes, generation time; empty for the generic kernels.
    std::string specialisation() const { return specialisation_; }
    // Memory of the code generated for this pattern so far (any thread).
    size_t pattern_code_bytes() const { return pattern_bytes_.load(); }

private:
    jit::sparse_kernel_params kernel_params(int nv) const;
    // The layer's code for tiles of nv vectors, generated on first use.
    const std::shared_ptr<const jit::jit_spmm_pattern_kernel> &pattern_code(int nv) const;

    std::vector<int64_t> bounds_;
    source_groups groups_;
    int lanes_;
    cpu_isa isa_;
    jit::sparse_dtype dtype_;
    jit::s8_word word_;
    std::vector<std::shared_ptr<const jit::jit_spmm_kernel>> generic_; // per vector count
    std::unique_ptr<spmm_schedule> schedule_;                          // specialised only
    jit::spmm_pattern_shape shape_;
    struct pattern_slot {
        std::once_flag once;
        std::shared_ptr<const jit::jit_spmm_pattern_kernel> code;
    };
    mutable std::vector<pattern_slot> pattern_;    // per vector count
    mutable std::atomic<size_t> pattern_bytes_{0}; // memory of the pattern code so far
    std::string specialisation_;
};

} // namespace qsp::detail
