// Exact dense-torch semantics for non-finite inputs: a dense layer multiplies
// every pruned (zero) weight by its input, so one Inf or NaN input poisons
// outputs a sparse kernel would leave finite. Detecting them costs one read
// of the input; the rare calls that have them run the reference kernel with
// the weights scattered into a fully dense pattern.
#pragma once

#include "primitives/primitive_impl.hpp"

namespace qsp::detail {

// True for f32 forward / backward-data calls whose input holds a NaN or Inf.
// (s8 has no dense equivalent: a non-finite tensor makes its per-tensor
// scale NaN and the whole output NaN, as documented in docs/quantization.md.)
bool needs_dense_semantics(const problem &p, const tensors &t);
void execute_with_dense_semantics(const problem &p, const tensors &t);

} // namespace qsp::detail
