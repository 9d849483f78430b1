// Per-calling-thread scratch memory that persists between executions: a
// fresh multi-MB allocation per call costs page faults comparable to the
// kernels themselves. Slot s of an execution stays valid until the same
// thread's next execution; take the pointer *before* an OpenMP region (the
// workers have scratch of their own).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qsp::detail {

constexpr int scratch_slots = 8;

void *scratch_bytes(int slot, size_t bytes);

template <typename T> T *scratch(int slot, int64_t elems) {
    return static_cast<T *>(
            scratch_bytes(slot, sizeof(T) * static_cast<size_t>(elems > 0 ? elems : 1)));
}

// Row boundaries for `parts` parts of about equal cost (nnz + a per-row
// overhead): the partition of the JIT kernels' rows over threads.
std::vector<int64_t> balance_rows(const int64_t *row_ptr, int64_t rows, int parts);

} // namespace qsp::detail
