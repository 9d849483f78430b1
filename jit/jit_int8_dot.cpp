#include "jit/jit_int8_dot.hpp"

namespace qsp::jit {

void emit_int8_dot_constants(Xbyak::CodeGenerator &g, const Xbyak::Xmm &ones16,
                             const Xbyak::Xmm &nibble_mask, const Xbyak::Label &table) {
    g.vpbroadcastd(ones16, g.dword[g.rip + table]);
    g.vpbroadcastd(nibble_mask, g.dword[g.rip + table + 4]);
}

void emit_int8_dot_constant_table(Xbyak::CodeGenerator &g, Xbyak::Label &table) {
    g.align(4);
    g.L(table);
    g.dd(0x00010001u); // int16 ones
    g.dd(0x0f0f0f0fu); // low-nibble mask
}

void emit_split_nibbles(Xbyak::CodeGenerator &g, const Xbyak::Xmm &a, const Xbyak::Xmm &lo,
                        const Xbyak::Xmm &hi, const Xbyak::Xmm &nibble_mask) {
    // vpandd is EVEX only; vpand has no zmm form.
    if (a.isZMM()) {
        g.vpandd(lo, a, nibble_mask);
        g.vpsrlw(hi, a, 4); // bits of the neighbour byte land in the high nibble: masked off
        g.vpandd(hi, hi, nibble_mask);
    } else {
        g.vpand(lo, a, nibble_mask);
        g.vpsrlw(hi, a, 4);
        g.vpand(hi, hi, nibble_mask);
    }
}

void emit_dot_u8s8_nibbles(Xbyak::CodeGenerator &g, const Xbyak::Xmm &acc, const Xbyak::Xmm &a_lo,
                           const Xbyak::Xmm &a_hi, const Xbyak::Operand &b,
                           const Xbyak::Xmm &ones16, const Xbyak::Xmm &t_lo, const Xbyak::Xmm &t_hi,
                           bool accumulate) {
    g.vpmaddubsw(t_lo, a_lo, b);
    g.vpmaddubsw(t_hi, a_hi, b);
    g.vpmaddwd(t_lo, t_lo, ones16);
    g.vpmaddwd(t_hi, t_hi, ones16);
    g.vpslld(t_hi, t_hi, 4);
    if (accumulate) {
        g.vpaddd(acc, acc, t_lo);
        g.vpaddd(acc, acc, t_hi);
    } else {
        g.vpaddd(acc, t_lo, t_hi);
    }
}

} // namespace qsp::jit
