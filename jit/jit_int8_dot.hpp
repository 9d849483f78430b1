// u8 x s8 dot products of 4-byte groups without VNNI, exact, on zmm
// (AVX-512BW, EVEX) or ymm (AVX2, VEX) registers.
// vpdpbusd adds a[4i..4i+3] . b[4i..4i+3] to 32-bit lane i; vpmaddubsw alone
// would saturate (255 * 127 * 2 > 32767), so a is split into nibbles,
// a = 16 * hi + lo: each vpmaddubsw pair sum is at most 15 * 127 * 2, then
// vpmaddwd with ones widens the pairs to int32, and acc += lo + 16 * hi.
// About 5x the instructions of one vpdpbusd: the dispatcher's measurement
// decides whether the sparse kernel still beats oneDNN's dense int8 matmul.
// No plan picks it any more: the s8 kernels without VNNI multiply in int16
// exactly (entry pairs and SDDMM rows: signed bytes, vpsignb or a masked
// negation + vpmaddubsw; channel pairs: vpmaddwd), which costs far fewer
// instructions. The SpMM kernels still emit it for quad words on tiers
// without vpdpbusd (tested against the reference), the exact fallback.
#pragma once

#include <xbyak/xbyak.h>

namespace qsp::jit {

// Fills ones16 (int16 1s) and nibble_mask (0x0f bytes) from `table`, where
// emit_int8_dot_constant_table() put them (no general register is touched,
// so kernels can refill them anywhere).
void emit_int8_dot_constants(Xbyak::CodeGenerator &g, const Xbyak::Xmm &ones16,
                             const Xbyak::Xmm &nibble_mask, const Xbyak::Label &table);
// The two dwords behind `table` (emit after the code, e.g. after postamble).
void emit_int8_dot_constant_table(Xbyak::CodeGenerator &g, Xbyak::Label &table);

// lo = a & 0x0f, hi = (a >> 4) & 0x0f, bytewise.
void emit_split_nibbles(Xbyak::CodeGenerator &g, const Xbyak::Xmm &a, const Xbyak::Xmm &lo,
                        const Xbyak::Xmm &hi, const Xbyak::Xmm &nibble_mask);

// acc (+)= per-lane sums of (16 * a_hi + a_lo) * b over 4-byte groups; b is a
// zmm or a 64-byte memory operand. With `accumulate` false acc is overwritten.
void emit_dot_u8s8_nibbles(Xbyak::CodeGenerator &g, const Xbyak::Xmm &acc, const Xbyak::Xmm &a_lo,
                           const Xbyak::Xmm &a_hi, const Xbyak::Operand &b,
                           const Xbyak::Xmm &ones16, const Xbyak::Xmm &t_lo, const Xbyak::Xmm &t_hi,
                           bool accumulate);

} // namespace qsp::jit
