// The per-layer plans of the sparse JIT implementations (offsets, transposed
// patterns, row partitions and the generated kernels they call), cached
// under the whole problem: the pattern is compared in full on every hit (its
// hash only picks the bucket), so a plan never runs on a pattern it was not
// built for. Plans do not depend on the batch size: every batch size of a
// layer shares one.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "primitives/core/implementation.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

// The plan of implementation `impl` (at `isa`) for p (its batch size is
// ignored), built by make() on first use. QSP_VERBOSE=1 reports whether it
// was generated or found, and how long that took.
std::shared_ptr<const kernel>
cached_plan(const char *impl, cpu_isa isa, const problem &p,
            const std::function<std::shared_ptr<const kernel>()> &make);

} // namespace qsp::detail
