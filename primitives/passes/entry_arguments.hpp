// What the passes' public entry points (qsparseprop/primitives.hpp) share
// before they call a pass: the team size, and the named refusal of a null
// pointer.
#pragma once

#include <stdexcept>
#include <string>

#include <omp.h>

namespace qsp::detail {

// num_threads <= 0: OpenMP's default team.
inline int threads_or_default(int num_threads) {
    return num_threads > 0 ? num_threads : omp_get_max_threads();
}

// std::invalid_argument "<what>: <name> is null" for a null p.
inline void require_non_null(const void *p, const char *what, const char *name) {
    if (p == nullptr) throw std::invalid_argument(std::string(what) + ": " + name + " is null");
}

} // namespace qsp::detail
