#include "jit/jit_int8_dot.hpp"

namespace qsp::jit {

void emit_int8_dot_constants(Xbyak::CodeGenerator &g, const Xbyak::Zmm &ones16,
                             const Xbyak::Zmm &nibble_mask) {
    g.mov(g.eax, 0x00010001);
    g.vpbroadcastd(ones16, g.eax);
    g.mov(g.eax, 0x0f0f0f0f);
    g.vpbroadcastd(nibble_mask, g.eax);
}

void emit_split_nibbles(Xbyak::CodeGenerator &g, const Xbyak::Zmm &a, const Xbyak::Zmm &lo,
                        const Xbyak::Zmm &hi, const Xbyak::Zmm &nibble_mask) {
    g.vpandd(lo, a, nibble_mask);
    g.vpsrlw(hi, a, 4); // bits of the neighbour byte land in the high nibble: masked off
    g.vpandd(hi, hi, nibble_mask);
}

void emit_dot_u8s8_nibbles(Xbyak::CodeGenerator &g, const Xbyak::Zmm &acc, const Xbyak::Zmm &a_lo,
                           const Xbyak::Zmm &a_hi, const Xbyak::Operand &b,
                           const Xbyak::Zmm &ones16, const Xbyak::Zmm &t_lo, const Xbyak::Zmm &t_hi,
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
