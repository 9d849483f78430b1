// SpMM code specialised to one layer's pattern, generated when the layer's
// plan is built (jit_uni_spmm_kernel.hpp is the shared generic rival; the
// tuner keeps whichever is faster per layer and direction).
//
// The generic kernel runs one loop per row segment (a row's entries in one
// source group) whose trip count is the segment's length: on a random
// pattern the loop exit mispredicts once per segment (~15-20 cycles), a
// cost that rivals the multiply-adds of a dozen entries and made L1-sized
// source groups lose (spmm_plan.hpp, linear_min_group_items). Here the
// plan sorts each group's rows by length (spmm_schedule), and the code
// holds one body per segment length that the layer has, unrolled to exactly
// that length: a bucket of equal-length rows runs its body in a loop whose
// only exit is the end of the bucket. Lengths above the code budget share a
// looped body. The same entry arithmetic as the generic kernel
// (jit_spmm_entry.hpp), in the same order: f32 sums are bit-identical to it
// over the same groups.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "jit/jit_sparse_kernel.hpp"
#include "jit/tile_abi.hpp"

namespace qsp::jit {

using jit_spmm_pattern_kernel = jit_sparse_kernel<spmm_schedule_call_params>;

// What the code is specialised to: the segment lengths (entries of a row in
// one group) the layer has, and the code budget.
struct spmm_pattern_shape {
    std::vector<int64_t> lengths; // ascending, distinct, each >= 1
    size_t code_budget = 192 * 1024;
};

// The lengths that get an exact body: the shortest first while the code
// fits the budget (longer segments pay their loop less per entry).
std::vector<int64_t> exact_body_lengths(const sparse_kernel_params &params,
                                        const spmm_pattern_shape &shape);

template <cpu_isa isa> class jit_uni_spmm_pattern_kernel_t : public jit_spmm_pattern_kernel {
public:
    jit_uni_spmm_pattern_kernel_t(const sparse_kernel_params &params,
                                  const spmm_pattern_shape &shape);
    const std::vector<int64_t> &exact_lengths() const { return exact_; }

private:
    void generate() override;
    std::vector<int64_t> exact_;
};

// The layer's code (not shared: it belongs to the layer's plan); throws
// std::invalid_argument for parameters no tier supports.
std::shared_ptr<const jit_spmm_pattern_kernel>
spmm_pattern_kernel(const sparse_kernel_params &params, const spmm_pattern_shape &shape);

} // namespace qsp::jit
