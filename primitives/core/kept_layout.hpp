// The kept layout at the core (qsp::kept_layout_desc): implementations whose
// kernels do not read it run on plain copies of the kept arguments, made and
// written back here, so every implementation accepts every layout.
#pragma once

#include <functional>

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// Elements of a kept tensor of `batch` x `features` (its padding included).
int64_t kept_elems(int64_t batch, int64_t features);

// Runs `run` with t's arguments in the plain layout: kept inputs (forward:
// src; backward-data: diff_dst; backward-weights: src and diff_dst) are
// unpacked into scratch first, a kept output (forward: dst; backward-data:
// diff_src) is written to scratch and packed into its kept memory after.
// Linear only (the one operation that takes the layout).
const char *run_on_plain_layout(const problem &p, const tensors &t, bool src_kept, bool dst_kept,
                                const std::function<const char *(const tensors &)> &run);

} // namespace qsp::detail
