#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// The portable reference implementation ("ref:any"): accepts every valid problem.
implementation ref_implementation();

} // namespace qsp::detail
