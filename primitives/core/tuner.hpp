// The tuner's decision store, as the core's dispatch reads it (the public
// side is include/qsparseprop/tuning.hpp).
#pragma once

#include <string>

#include "primitives/core/problem.hpp"

namespace qsp::detail {

// The implementation the tuner chose for p at the effective ISA, or "".
std::string stored_decision(const problem &p);

} // namespace qsp::detail
