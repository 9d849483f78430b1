#include "jit/jit_avx512_spmm.hpp"

#include "jit/jit_int8_dot.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

namespace qsp::jit {

using namespace Xbyak;

namespace {

void check_n_vec(int n_vec) {
    if (n_vec < 1 || n_vec > tile_batch / 16)
        throw std::invalid_argument("jit kernel: n_vec must be in [1, 4], got "
                                    + std::to_string(n_vec));
}

// Code of one kernel stays far below this; the bound only guards mistakes.
constexpr size_t kernel_code_bytes = 16 * 1024;

} // namespace

jit_avx512_spmm_kernel::jit_avx512_spmm_kernel(spmm_type type, int n_vec)
    : jit_generator(std::string(type == spmm_type::f32        ? "avx512_spmm_f32_v"
                                : type == spmm_type::s8_quads ? "avx512_vnni_spmm_s8q_v"
                                                              : "avx512_spmm_s8q_v")
                            + std::to_string(n_vec),
                    kernel_code_bytes),
      type_(type), n_vec_(n_vec) {
    check_n_vec(n_vec);
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx512_spmm_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 values = r8, offsets = r9, row_ptr = r10, row = r11, row_end = r12, src = r13,
                dst = r14, i = rax, end = rdx;
    const Reg64 off[4] = {rsi, rdi, rbx, rbp}; // rdi is free once the params are read
    const int nv = n_vec_;
    const bool s8 = type_ != spmm_type::f32, vnni = type_ == spmm_type::s8_quads;
    // Without VNNI: the weight dword broadcast to a register, nibbles of x
    // and the int16 -> int32 products in temporaries (jit_int8_dot.hpp).
    const Zmm ones16(26), nibble_mask(27), x_lo(24), x_hi(25), t_lo(28), t_hi(29);
    auto wreg = [](int u) { return Zmm(20 + u); };
    auto dot = [&](const Zmm &acc, const Zmm &x, int u, const Address &w) {
        if (vnni) {
            vpdpbusd(acc, x, w);
            return;
        }
        emit_split_nibbles(*this, x, x_lo, x_hi, nibble_mask);
        emit_dot_u8s8_nibbles(*this, acc, x_lo, x_hi, wreg(u), ones16, t_lo, t_hi, true);
    };
    // s8: the u8 source vectors go to registers (vpdpbusd's unsigned operand)
    auto xreg = [](int u, int v) { return Zmm(12 + (u % 2) * 4 + v); };
    // Two accumulator sets alternate between consecutive nonzeros so that
    // FMA latency (4 cycles) does not serialise a row's updates.
    auto acc = [&](int set, int v) { return Zmm(set * 4 + v); };

    preamble();
    mov(values, ptr[param + offsetof(spmm_call_params, values)]);
    mov(offsets, ptr[param + offsetof(spmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(spmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(spmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(spmm_call_params, row_end)]);
    mov(src, ptr[param + offsetof(spmm_call_params, src_tile)]);
    mov(dst, ptr[param + offsetof(spmm_call_params, dst_tile)]);

    if (s8 && !vnni) emit_int8_dot_constants(*this, ones16, nibble_mask);
    Label row_loop, quad_loop, single_loop, store, done;
    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    for (int s = 0; s < 2; ++s)
        for (int v = 0; v < nv; ++v)
            vxorps(acc(s, v), acc(s, v), acc(s, v));
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(quad_loop);
    lea(rcx, ptr[i + 4]);
    cmp(rcx, end);
    jg(single_loop, T_NEAR);
    for (int u = 0; u < 4; ++u)
        movsxd(off[u], dword[offsets + i * 4 + u * 4]);
    for (int u = 0; u < 4; ++u) {
        if (s8) {
            if (!vnni) vpbroadcastd(wreg(u), dword[values + i * 4 + u * 4]);
            for (int v = 0; v < nv; ++v) {
                vmovdqu32(xreg(u, v), zword[src + off[u] + v * 64]);
                dot(acc(u % 2, v), xreg(u, v), u, zword_b[values + i * 4 + u * 4]);
            }
        } else {
            vbroadcastss(Zmm(8 + u), dword[values + i * 4 + u * 4]);
            for (int v = 0; v < nv; ++v)
                vfmadd231ps(acc(u % 2, v), Zmm(8 + u), zword[src + off[u] + v * 64]);
        }
    }
    add(i, 4);
    jmp(quad_loop);

    L(single_loop);
    cmp(i, end);
    jge(store, T_NEAR);
    movsxd(off[0], dword[offsets + i * 4]);
    if (s8) {
        if (!vnni) vpbroadcastd(wreg(0), dword[values + i * 4]);
        for (int v = 0; v < nv; ++v) {
            vmovdqu32(xreg(0, v), zword[src + off[0] + v * 64]);
            dot(acc(0, v), xreg(0, v), 0, zword_b[values + i * 4]);
        }
    } else {
        vbroadcastss(zmm8, dword[values + i * 4]);
        for (int v = 0; v < nv; ++v)
            vfmadd231ps(acc(0, v), zmm8, zword[src + off[0] + v * 64]);
    }
    inc(i);
    jmp(single_loop);

    L(store);
    mov(rcx, row);
    shl(rcx, 8); // * tile_row_bytes
    for (int v = 0; v < nv; ++v) {
        if (s8)
            vpaddd(acc(0, v), acc(0, v), acc(1, v));
        else
            vaddps(acc(0, v), acc(0, v), acc(1, v));
        vmovups(zword[dst + rcx + v * 64], acc(0, v));
    }
    inc(row);
    jmp(row_loop);

    L(done);
    postamble();
}

} // namespace qsp::jit
