// Reducing 16 zmm (or 8 ymm) vectors to one vector of their horizontal sums,
// shared by all the SDDMM (backward-weights) kernels: four rounds of shuffles and adds
// (128-bit quarters, then 64-bit halves, then lanes), ~3 instructions per
// input instead of a full horizontal sum each. The tree permutes the sums;
// one vpermd/vpermps with reduce16_lane_of() puts sum j in lane j.
#pragma once

#include <array>
#include <cstdint>

#include <xbyak/xbyak.h>

namespace qsp::jit {

enum class reduce_kind { f32, s32 };

// lane_of[j] = the lane that holds the sum of input vector j after the tree.
const std::array<int32_t, 16> &reduce16_lane_of();

// Inputs in zmm0..15; uses zmm16..25; `perm` holds reduce16_lane_of() as
// dwords. Returns the index of the zmm holding the sums in input order.
int emit_reduce16(Xbyak::CodeGenerator &g, reduce_kind kind, const Xbyak::Zmm &perm);

// The AVX2 form: 8 ymm inputs (ymm0..7) -> their 8 sums in ymm0, permuted
// as reduce8_lane_of() says (three rounds: 128-bit halves, then vshufps
// twice). tmp_a / tmp_b are clobbered; the caller permutes (vpermps/vpermd).
const std::array<int32_t, 8> &reduce8_lane_of();
void emit_reduce8(Xbyak::CodeGenerator &g, reduce_kind kind, const Xbyak::Ymm &tmp_a,
                  const Xbyak::Ymm &tmp_b);

} // namespace qsp::jit
