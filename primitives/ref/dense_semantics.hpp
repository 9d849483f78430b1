// Exact dense-torch semantics for non-finite inputs: a dense layer multiplies
// every pruned (zero) weight by its input, so one Inf or NaN input poisons
// outputs a sparse kernel would leave finite. Detecting them costs one read
// of the input; the rare calls that have them run the reference kernel with
// the weights scattered into a fully dense pattern.
#pragma once

#include <memory>

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// `inner` itself for problems where sparse and dense agree on non-finite
// inputs (s8: a non-finite tensor makes its per-tensor scale NaN and the
// whole output NaN, as docs/quantization.md says; backward-weights: dW is
// only wanted at the nonzeros). Otherwise a kernel that checks each call's
// input and runs "ref:dense_semantics" when it holds a NaN or Inf.
std::shared_ptr<const kernel> with_dense_semantics(const problem &p,
                                                   std::shared_ptr<const kernel> inner);

} // namespace qsp::detail
