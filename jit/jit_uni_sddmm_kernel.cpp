#include "jit/jit_uni_sddmm_kernel.hpp"

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "jit/cpu_isa_traits.hpp"
#include "jit/jit_reduce.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {

void check_params(const sparse_kernel_params &p) {
    if (p.isa == cpu_isa::ref)
        throw std::invalid_argument("jit sddmm: the reference tier has no generated code");
    const int max_vec = p.dtype == sparse_dtype::s8 ? 1 : tile_batch / vector_lanes(p.isa);
    if (p.n_vec < 1 || p.n_vec > max_vec)
        throw std::invalid_argument("jit sddmm: n_vec must be in [1, " + std::to_string(max_vec)
                                    + "] for " + p.str() + ", got " + std::to_string(p.n_vec));
    if (p.avx_vnni && (p.isa != cpu_isa::avx2 || p.dtype != sparse_dtype::s8))
        throw std::invalid_argument("jit sddmm: avx_vnni applies to the avx2 s8 kernel only");
    check_s8_word(p, "sddmm", false);
}

} // namespace

template <cpu_isa isa>
jit_uni_sddmm_kernel_t<isa>::jit_uni_sddmm_kernel_t(const sparse_kernel_params &params)
    : jit_sddmm_kernel("sddmm", params) {
    check_params(params);
    finish();
}

template <cpu_isa isa> void jit_uni_sddmm_kernel_t<isa>::generate() {
    using traits = cpu_isa_traits<isa>;
    using Vmm = typename traits::Vmm;
    constexpr bool avx512 = traits::avx512;
    constexpr int vlen = traits::vlen;
    constexpr int group = avx512 ? 16 : 8; // nonzeros reduced together
    const bool s8 = params_.dtype == sparse_dtype::s8;
    const bool native = native_dot(isa, params_.dtype, params_.avx_vnni);
    // Without VNNI (AVX2, avx512_core) signed bytes are multiplied in int16
    // instead of emulating vpdpbusd: the pixel's dY row (G + 128 as u8)
    // becomes G (xor 0x80) and |G| once; per 32 (64) batch elements of a
    // nonzero, x takes G's signs (AVX2: vpsignb; AVX-512, which has no
    // vpsignb: x negated under the mask of G's negative bytes; where G = 0
    // the product is 0 either way) and vpmaddubsw multiplies it by |G| and adds
    // neighbouring batch elements (exact: |G_b x_b + G_b+1 x_b+1| <=
    // 2 * 127 * 127, sources and gradients in [-127, 127]), one vpmaddwd
    // with ones sums those pairs to int32: 10 instructions per nonzero per
    // tile, none of them a lane-crossing shuffle (widening x with vpmovsxbw
    // took 12, four of them; the nibble emulation 11 and 4 constants). The
    // sums are of G * X: sddmm_dy_shift() is 0.
    const bool signed_bytes = s8 && !native;
    // Vectors per tile row this kernel reads: a 64-byte s8 row is 1 zmm or 2
    // ymm.
    const int nv = s8 ? s8_tile_row_bytes / vlen : params_.n_vec;

    // Registers. Accumulators of the group: 0..group-1.
    // avx512: 16..25 the reduction tree (16/17 hold products while the
    //   dots run), 26 the old dW / 0x80 bytes (refilled per group), 27 the
    //   lane permutation, 28..31 the dY row of the pixel (f32; s8: 28 whole
    //   or G, 29 zero, 30 |G|, 31 int16 ones; k2 G's negative bytes).
    // avx2: 8..11 the dY row (s8: whole; signed bytes: 8/9 G, 10/11 |G|;
    //   f32: half of it at a time), 12 int16 ones (signed bytes), 13/14
    //   products and the tree, 15 the permutation / store mask (signed
    //   bytes: 0x80 bytes while the pixels run).
    auto acc = [](int j) { return Vmm(j); };
    auto g = [&](int v) { return Vmm(avx512 ? 28 + v : 8 + v); };
    auto g_abs = [&](int v) { return Vmm(avx512 ? 30 : 10 + v); };
    const Vmm ones16(avx512 ? 31 : 12), t_lo(avx512 ? 16 : 13), t_hi(avx512 ? 17 : 14),
            zero(29); // avx512 signed bytes only

    // General registers; rdi keeps the params. The pixel loop's row starts
    // and counter live in a small stack frame.
    const Reg64 param = rdi, offsets = r9, row_ptr = r10, row = r11, row_end = r12, dw = r15,
                i = rax, end = rdx, off = rsi, x_pix = rbx, dy_pix = rbp, pix_w = rcx, dy_row = r13,
                tmp = r14;
    const Address pix_h_left = qword[rsp], x_pix_row = qword[rsp + 8], dy_pix_row = qword[rsp + 16];
    auto field = [&](size_t offset) { return qword[param + offset]; };
    constexpr size_t pix = offsetof(sddmm_call_params, pix);

    // dY of the current pixel into registers (AVX2 f32: half a row at a
    // time, below).
    const Vmm sign_bit(avx512 ? 26 : 15);
    auto load_dy = [&] {
        if (signed_bytes && avx512) { // nv = 1: a 64-byte row
            vpxord(g(0), sign_bit, ptr[dy_pix]);
            vpabsb(g_abs(0), g(0));
            vpmovb2m(k2, g(0));
        } else if (signed_bytes) {
            for (int v = 0; v < nv; ++v) {
                vpxor(g(v), sign_bit, ptr[dy_pix + v * vlen]);
                vpabsb(g_abs(v), g(v));
            }
        } else if (s8 || avx512) {
            for (int v = 0; v < nv; ++v)
                vmovups(g(v), ptr[dy_pix + v * vlen]);
        }
    };
    // acc_j += dot(dY of the pixel, x row of entry i + j at the pixel)
    auto dot = [&](int j) {
        movsxd(off, dword[offsets + i * 4 + j * 4]);
        for (int v = 0; v < nv; ++v) {
            const Address xv = ptr[x_pix + off + v * vlen];
            if (!s8) {
                vfmadd231ps(acc(j), g(v), xv); // AVX-512 (AVX2 f32 runs its own loop)
            } else if (signed_bytes) {
                const Vmm t = (j + v) % 2 ? t_hi : t_lo; // alternate: two in flight
                if (avx512) {
                    vmovdqu8(t, xv);
                    vpsubb(t | k2, zero, t);
                } else {
                    vmovdqu(t, xv);
                    vpsignb(t, t, g(v));
                }
                vpmaddubsw(t, g_abs(v), t);
                vpmaddwd(t, t, ones16);
                vpaddd(acc(j), acc(j), t);
            } else if (avx512) {
                vpdpbusd(acc(j), g(v), xv);
            } else {
                vpdpbusd(acc(j), g(v), xv, VexEncoding);
            }
        }
    };

    // Rows of pixels outside: the source rows one row of pixels needs stay
    // in cache while every group of every row uses them; each group reduces
    // and adds its sums once per row of pixels.
    Label tables, pix_h_loop, row_loop, rows_done, group_loop, pix_w_loop, next_row, done;
    preamble();
    sub(rsp, 24);
    mov(offsets, field(offsetof(sddmm_call_params, src_offsets)));
    mov(row_ptr, field(offsetof(sddmm_call_params, row_ptr)));
    mov(row_end, field(offsetof(sddmm_call_params, row_end)));
    mov(dw, field(offsetof(sddmm_call_params, diff_values)));
    // An empty pixel grid computes nothing (the loops below count down).
    cmp(field(pix + offsetof(pixel_grid, n_h)), 1);
    jl(done, T_NEAR);
    cmp(field(pix + offsetof(pixel_grid, n_w)), 1);
    jl(done, T_NEAR);
    if (avx512) vmovups(Zmm(27), ptr[rip + tables]);
    mov(tmp, field(offsetof(sddmm_call_params, x_tile)));
    mov(x_pix_row, tmp);
    mov(tmp, field(offsetof(sddmm_call_params, dy_tile)));
    mov(dy_pix_row, tmp);
    mov(tmp, field(pix + offsetof(pixel_grid, n_h)));
    mov(pix_h_left, tmp);

    L(pix_h_loop);
    mov(row, field(offsetof(sddmm_call_params, row_begin)));

    L(row_loop);
    cmp(row, row_end);
    jge(rows_done, T_NEAR);
    mov(dy_row, row);
    imul(dy_row, field(offsetof(sddmm_call_params, dy_row_stride)));
    add(dy_row, dy_pix_row);
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(group_loop);
    cmp(i, end);
    jge(next_row, T_NEAR);
    if (avx512) {
        // k1 = lanes of this group that are real nonzeros of the row; the
        // rest compute on whatever offsets follow (always readable: padded)
        // and are masked off at the store.
        mov(rcx, end);
        sub(rcx, i);
        mov(tmp, group);
        cmp(rcx, tmp);
        cmovg(rcx, tmp);
        mov(tmp.cvt32(), 1);
        shl(tmp.cvt32(), cl);
        dec(tmp.cvt32());
        kmovw(k1, tmp.cvt32());
    }
    if (signed_bytes && avx512) { // the store below takes register 26 back: per group
        mov(tmp.cvt32(), 0x00010001);
        vpbroadcastd(ones16, tmp.cvt32());
        mov(tmp.cvt32(), 0x80808080);
        vpbroadcastd(sign_bit, tmp.cvt32());
        vpxord(zero, zero, zero);
    } else if (signed_bytes) { // the store below takes register 15 back: per group
        vpcmpeqw(ones16, ones16, ones16);
        vpsrlw(ones16, ones16, 15);
        mov(tmp.cvt32(), 0x80808080);
        vmovd(Xmm(sign_bit.getIdx()), tmp.cvt32());
        vpbroadcastd(sign_bit, Xmm(sign_bit.getIdx()));
    }
    for (int j = 0; j < group; ++j)
        vpxor(Xmm(j), Xmm(j), Xmm(j)); // zeroes the whole register (VEX)
    mov(x_pix, x_pix_row);
    mov(dy_pix, dy_row);
    mov(pix_w, field(pix + offsetof(pixel_grid, n_w)));
    L(pix_w_loop);
    if (!s8 && !avx512) {
        // AVX2 f32: the 8 accumulators leave room for half a dY row (4
        // vectors) in registers: per half, the group's 8 x rows are read as
        // FMA memory operands, one instruction per vector (reading dY from
        // L1 instead took a load and an FMA per vector).
        for (int h = 0; 4 * h < nv; ++h) {
            const int first = 4 * h, last = std::min(nv, first + 4);
            for (int v = first; v < last; ++v)
                vmovups(g(v - first), ptr[dy_pix + v * vlen]);
            for (int j = 0; j < group; ++j) {
                movsxd(off, dword[offsets + i * 4 + j * 4]);
                for (int v = first; v < last; ++v)
                    vfmadd231ps(acc(j), g(v - first), ptr[x_pix + off + v * vlen]);
            }
        }
    } else {
        load_dy();
        for (int j = 0; j < group; ++j)
            dot(j);
    }
    add(x_pix, field(pix + offsetof(pixel_grid, src_w)));
    add(dy_pix, field(pix + offsetof(pixel_grid, dst_w)));
    dec(pix_w);
    jnz(pix_w_loop, T_NEAR);

    const reduce_kind kind = s8 ? reduce_kind::s32 : reduce_kind::f32;
    if (avx512) {
        const Zmm ordered(emit_reduce16(*this, kind, Zmm(27))), old(26);
        vmovups(old | k1 | T_z, ptr[dw + i * 4]);
        if (s8)
            vpaddd(old, old, ordered);
        else
            vaddps(old, old, ordered);
        vmovups(ptr[dw + i * 4] | k1, old);
    } else {
        const Ymm scratch(15);
        emit_reduce8(*this, kind, t_lo, t_hi);
        vmovdqu(scratch, ptr[rip + tables]);
        if (s8)
            vpermd(ymm1, scratch, ymm0);
        else
            vpermps(ymm1, scratch, ymm0);
        // A whole group adds its 8 sums with a plain load and store; the
        // row's last, partial group masks lanes j >= end - i (AMD's masked
        // stores are microcoded: about 10x a plain one, once per group).
        Label partial, stored;
        mov(tmp, end);
        sub(tmp, i);
        cmp(tmp, group);
        jl(partial, T_NEAR);
        vmovups(ymm2, ptr[dw + i * 4]);
        if (s8)
            vpaddd(ymm2, ymm2, ymm1);
        else
            vaddps(ymm2, ymm2, ymm1);
        vmovups(ptr[dw + i * 4], ymm2);
        jmp(stored, T_NEAR);
        L(partial);
        vmovd(Xmm(scratch.getIdx()), tmp.cvt32()); // 1..7
        vpbroadcastd(scratch, Xmm(scratch.getIdx()));
        vpcmpgtd(scratch, scratch, ptr[rip + tables + 32]);
        if (s8) {
            vpmaskmovd(ymm2, scratch, ptr[dw + i * 4]);
            vpaddd(ymm2, ymm2, ymm1);
            vpmaskmovd(ptr[dw + i * 4], scratch, ymm2);
        } else {
            vmaskmovps(ymm2, scratch, ptr[dw + i * 4]);
            vaddps(ymm2, ymm2, ymm1);
            vmaskmovps(ptr[dw + i * 4], scratch, ymm2);
        }
        L(stored);
    }
    add(i, group);
    jmp(group_loop, T_NEAR);

    L(next_row);
    inc(row);
    jmp(row_loop, T_NEAR);

    L(rows_done);
    mov(tmp, x_pix_row);
    add(tmp, field(pix + offsetof(pixel_grid, src_h)));
    mov(x_pix_row, tmp);
    mov(tmp, dy_pix_row);
    add(tmp, field(pix + offsetof(pixel_grid, dst_h)));
    mov(dy_pix_row, tmp);
    dec(pix_h_left);
    jnz(pix_h_loop, T_NEAR);

    L(done);
    add(rsp, 24);
    postamble();

    align(64);
    L(tables);
    if (avx512) {
        for (int32_t lane : reduce16_lane_of())
            dd(static_cast<uint32_t>(lane));
    } else {
        for (int32_t lane : reduce8_lane_of())
            dd(static_cast<uint32_t>(lane));
        for (int j = 0; j < 8; ++j) // lane index, for the store mask
            dd(static_cast<uint32_t>(j));
    }
}

int sddmm_dy_shift(const sparse_kernel_params &params) {
    if (params.dtype != sparse_dtype::s8) return 0;
    const bool signed_bytes = !native_dot(params.isa, params.dtype, params.avx_vnni);
    return signed_bytes ? 0 : 128;
}

template class jit_uni_sddmm_kernel_t<cpu_isa::avx2>;
template class jit_uni_sddmm_kernel_t<cpu_isa::avx512_core>;
template class jit_uni_sddmm_kernel_t<cpu_isa::avx512_core_vnni>;

std::shared_ptr<const jit_sddmm_kernel> sddmm_kernel(const sparse_kernel_params &params) {
    static runtime::lru_cache<sparse_kernel_params, jit_sddmm_kernel, sparse_kernel_params_hash>
            cache("jit_code:sddmm");
    return cache.get_or_create(params, [&] {
        return make_for_isa<jit_uni_sddmm_kernel_t, jit_sddmm_kernel>(params, "sddmm");
    });
}

} // namespace qsp::jit
