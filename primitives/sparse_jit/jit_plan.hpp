// The skeleton every JIT plan shares (oneDNN's primitive shape, for the
// per-layer plans): the problem it serves at batch 0, so one plan serves
// every batch size; execute() dispatching to the three directions, each with
// a scratchpad of its own call; and the one parallel loop over row parts and
// batch tiles that the kernels run in.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <omp.h>

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

class jit_plan : public kernel {
public:
    const char *execute(const tensors &t) const final {
        runtime::scratchpad sp;
        switch (p_.dir) {
            case direction::forward:
                return forward(t, sp);
            case direction::backward_data:
                return backward_data(t, sp);
            case direction::backward_weights:
                return backward_weights(t, sp);
        }
        return nullptr;
    }

    // The pattern's copy, the arrays a plan derives from it (entry offsets,
    // row starts, source groups: about three times the pattern, estimated)
    // and the code generated for this layer alone.
    size_t memory_bytes() const override {
        const size_t pattern = static_cast<size_t>(p_.pattern.rows() + 1) * sizeof(int64_t)
                               + static_cast<size_t>(p_.pattern.nnz()) * sizeof(int32_t);
        return sizeof(*this) + 4 * pattern + owned_code_bytes();
    }

protected:
    explicit jit_plan(const problem &p) : p_(p.without_batch()) {}
    // Code generated for this layer alone (pattern-specialised), so far.
    virtual size_t owned_code_bytes() const { return 0; }

    // What kernel::execute returns: nullptr, or kernel::non_finite_input
    // from a direction that checks its input (checks_finite_input()). A plan
    // is built for its problem's direction; a family whose plans differ per
    // direction overrides only its own.
    virtual const char *forward(const tensors &, runtime::scratchpad &) const {
        return other_direction();
    }
    virtual const char *backward_data(const tensors &, runtime::scratchpad &) const {
        return other_direction();
    }
    virtual const char *backward_weights(const tensors &, runtime::scratchpad &) const {
        return other_direction();
    }

    problem p_; // batch 0

private:
    [[noreturn]] const char *other_direction() const {
        throw std::logic_error(std::string("a ") + to_string(p_.dir)
                               + " plan was asked to run another direction");
    }
};

// body(part, tile) for every row part of `bounds` (bounds.size() - 1 parts)
// and each of `tiles` batch tiles: parts are spread over the team, and a
// part's tiles run in order on one thread. A part's rows are written by one
// thread only (no atomics, no private copies), and each row accumulates its
// tiles in the same order whatever the team size: results do not depend on
// the thread count.
template <typename body_t>
void for_parts_and_tiles(const std::vector<int64_t> &bounds, int64_t tiles, int threads,
                         body_t body) {
    const int parts = static_cast<int>(bounds.size()) - 1;
#pragma omp parallel num_threads(threads)
    {
        const int nthr = omp_get_num_threads(), tid = omp_get_thread_num();
        for (int part = tid; part < parts; part += nthr)
            for (int64_t tile = 0; tile < tiles; ++tile)
                body(part, tile);
    }
}

} // namespace qsp::detail
