// The per-layer plans of the JIT implementations (offsets, transposed
// patterns, partitions, the kernels they call), cached in the LRU kernel
// cache under keys that carry the pattern hash, shapes, ISA and threads.
// Plans do not depend on the batch size: every batch size shares one.
#pragma once

#include <functional>
#include <memory>

#include "primitives/primitive_impl.hpp"
#include "runtime/kernel_cache.hpp"

namespace qsp::detail {

// The plan for key, built by make() on first use; QSP_VERBOSE=1 reports
// whether it was generated or found, and how long that took.
std::shared_ptr<const kernel>
cached_plan(const runtime::kernel_key &key,
            const std::function<std::shared_ptr<const kernel>()> &make);

} // namespace qsp::detail
