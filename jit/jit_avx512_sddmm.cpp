#include "jit/jit_avx512_sddmm.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

#include "jit/jit_int8_dot.hpp"
#include "jit/jit_reduce16.hpp"

namespace qsp::jit {

using namespace Xbyak;

jit_avx512_sddmm_kernel::jit_avx512_sddmm_kernel(sddmm_type type, int n_vec)
    : jit_generator(std::string(type == sddmm_type::f32       ? "avx512_sddmm_f32_v"
                                : type == sddmm_type::s8_vnni ? "avx512_vnni_sddmm_s8_v"
                                                              : "avx512_sddmm_s8_v")
                            + std::to_string(n_vec),
                    16 * 1024),
      type_(type), n_vec_(n_vec) {
    if (n_vec < 1 || n_vec > 4 || (type != sddmm_type::f32 && n_vec != 1))
        throw std::invalid_argument("sddmm kernel: n_vec must be 1..4 (f32) or 1 (s8), got "
                                    + std::to_string(n_vec));
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx512_sddmm_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 offsets = r9, row_ptr = r10, row = r11, row_end = r12, x = r13, dy = r14, dw = r15,
                i = rax, end = rdx, off = rsi;
    const int nv = n_vec_;
    const bool s8 = type_ != sddmm_type::f32, vnni = type_ == sddmm_type::s8_vnni;
    // Without VNNI: G's nibbles split once per row (G is fixed along the
    // row); zmm16/17 (the tree's, free while the dots run) hold products.
    const Zmm g_lo(29), g_hi(30), ones16(31), nibble_mask(26), t_lo(16), t_hi(17);
    const Zmm perm(27), old(26);
    auto g = [](int v) { return Zmm(28 + v); };

    preamble();
    mov(offsets, ptr[param + offsetof(sddmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(sddmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(sddmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(sddmm_call_params, row_end)]);
    mov(x, ptr[param + offsetof(sddmm_call_params, x_tile)]);
    mov(dy, ptr[param + offsetof(sddmm_call_params, dy_tile)]);
    mov(dw, ptr[param + offsetof(sddmm_call_params, diff_values)]);
    Label perm_table, row_loop, group_loop, next_row, done;
    vmovups(perm, zword[rip + perm_table]);

    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    mov(rcx, row);
    shl(rcx, s8 ? 6 : 8); // * row bytes
    for (int v = 0; v < nv; ++v)
        vmovups(g(v), zword[dy + rcx + v * 64]);
    if (s8 && !vnni) { // before i is loaded: the constants go through eax
        emit_int8_dot_constants(*this, ones16, nibble_mask);
        emit_split_nibbles(*this, g(0), g_lo, g_hi, nibble_mask);
    }
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(group_loop);
    cmp(i, end);
    jge(next_row, T_NEAR);
    // k1 = lanes of this group that are real nonzeros of the row; the rest
    // compute on whatever offsets follow (always readable: padded) and are
    // masked off at the store.
    mov(rcx, end);
    sub(rcx, i);
    mov(ebx, 16);
    cmp(rcx, rbx);
    cmovg(rcx, rbx);
    mov(ebx, 1);
    shl(ebx, cl);
    dec(ebx);
    kmovw(k1, ebx);
    for (int j = 0; j < 16; ++j) {
        movsxd(off, dword[offsets + i * 4 + j * 4]);
        if (s8 && !vnni) {
            emit_dot_u8s8_nibbles(*this, Zmm(j), g_lo, g_hi, zword[x + off], ones16, t_lo, t_hi,
                                  false);
        } else if (s8) {
            // 16 lanes x 4 byte pairs: (G + 128) as u8 times X as s8
            vpxord(Zmm(j), Zmm(j), Zmm(j));
            vpdpbusd(Zmm(j), g(0), zword[x + off]);
        } else {
            vmulps(Zmm(j), g(0), zword[x + off]);
            for (int v = 1; v < nv; ++v)
                vfmadd231ps(Zmm(j), g(v), zword[x + off + v * 64]);
        }
    }
    const Zmm ordered(emit_reduce16(*this, s8 ? reduce16_kind::s32 : reduce16_kind::f32, perm));
    vmovups(old | k1 | T_z, zword[dw + i * 4]);
    if (s8)
        vpaddd(old, old, ordered);
    else
        vaddps(old, old, ordered);
    vmovups(zword[dw + i * 4] | k1, old);
    add(i, 16);
    jmp(group_loop);

    L(next_row);
    inc(row);
    jmp(row_loop);

    L(done);
    postamble();

    align(64);
    L(perm_table);
    for (int32_t lane : reduce16_lane_of())
        dd(static_cast<uint32_t>(lane));
}

} // namespace qsp::jit
