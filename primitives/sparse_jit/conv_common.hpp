// What the batch-innermost and the output-width-innermost Conv2d plans share.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "primitives/core/problem.hpp"
#include "primitives/sparse_jit/conv_layout.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

// Why a Conv2d JIT family of `strategy` at `isa` cannot take p for reasons
// of kind rather than size: the scheme, a vectorization forced to the other
// strategy, the tier rule (jit_tier_refusal) ("" if none applies).
std::string conv_isa_refusal(const problem &p, quant_scheme scheme, cpu_isa isa,
                             conv_vectorization strategy);

// s8 backward-weights: per kernel entry of `entries` (backward-weights' plan
// over the forward rows), the tap (ic, kh, kw) whose window sum of X the
// +128 shift of G adds to its weight, tap-major.
std::vector<int64_t> window_taps_of_entries(const conv_layout &l, const csr_pattern &p,
                                            const entry_plan &entries);

// s8 backward-weights: window_sum[(ic, kh, kw)] = the sum over batch and
// output pixels of the X value that tap (kh, kw) reads (0 in the padding),
// what a +128 shift of G adds to each weight of that tap, from plane_sum
// (in_c * in_h * in_w: the batch's sum of each element of X, column_sums_s8).
void conv_window_sums(const conv_layout &l, const int32_t *plane_sum, int64_t *window_sum,
                      int num_threads);

} // namespace qsp::detail
