// How a pass picks its tier: one table per pass, best first, ending with
// the portable loop; the first tier the effective ISA reaches runs. The
// effective ISA is read per call (the cap may change while a process runs).
// Tiers compute the same results (tested against the portable tier), so
// the pick changes speed only.
#pragma once

#include <cstddef>

#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

template <typename fn_t> struct pass_tier {
    cpu_isa isa;
    fn_t *fn;
};

// The best tier of `tiers` for this call; `vector_tiers_apply` false (a
// shape the vector tiers do not take) picks the portable one, the last.
template <typename fn_t, size_t n>
fn_t *best_tier(const pass_tier<fn_t> (&tiers)[n], bool vector_tiers_apply = true) {
    static_assert(n >= 1);
    if (vector_tiers_apply) {
        const cpu_isa effective = effective_cpu_isa();
        for (const pass_tier<fn_t> &t : tiers)
            if (effective >= t.isa) return t.fn;
    }
    return tiers[n - 1].fn;
}

} // namespace qsp::detail
