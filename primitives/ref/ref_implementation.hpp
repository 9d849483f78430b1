#pragma once

#include "primitives/primitive_impl.hpp"

namespace qsp::detail {

// The portable reference implementation ("ref:any"): accepts every valid problem.
implementation ref_implementation();

} // namespace qsp::detail
