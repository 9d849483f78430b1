// The tuner's decision store, as the core's dispatch reads it (the public
// side is include/qsparseprop/tuning.hpp).
#pragma once

#include <string>

#include "primitives/core/problem.hpp"
#include "qsparseprop/tuning.hpp"

namespace qsp::detail {

struct pd_impl;

// The implementation the tuner chose for p at the effective ISA, or "".
std::string stored_decision(const problem &p);

// qsp::tune on a descriptor's state, also while it is being created
// (primitive_attr::tune): before the pick, impl_name may still be empty.
tuning_result tune_problem(const pd_impl &pd, const tuning_options &options);

} // namespace qsp::detail
