// What every JIT implementation family shares: how its list entries are
// named and the one ISA rule by which a tier accepts or steps aside.
#pragma once

#include <string>
#include <vector>

#include "primitives/core/problem.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

// The JIT tiers of a scheme, best first: f32 avx512_core, avx2; s8
// avx512_core_vnni, avx512_core, avx2.
const std::vector<cpu_isa> &jit_tiers(quant_scheme scheme);

// "jit:<isa>" or "jit:<isa>:<variant>", as a string that lives as long as
// the process (the list, plan-cache keys and verbose lines hold the pointer).
const char *jit_implementation_name(cpu_isa isa, const char *variant = nullptr);

// The ISA rule of the JIT families, in one place and one wording: the tier
// `isa` of `scheme` runs once the effective ISA reaches it, and steps aside
// for the best tier of the scheme that the CPU runs ("" when it accepts).
std::string jit_tier_refusal(quant_scheme scheme, cpu_isa isa);

// Which code a Linear SpMM implementation runs: the generic kernels, or code
// generated for the layer's pattern (forward and backward-data; the tuner
// measures the two against each other).
enum class spmm_code { generic, pattern };

} // namespace qsp::detail
