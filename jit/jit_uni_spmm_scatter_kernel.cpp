#include "jit/jit_uni_spmm_scatter_kernel.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "jit/cpu_isa_traits.hpp"
#include "jit/jit_int8_dot.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {

void check_params(const sparse_kernel_params &p) {
    const int max_vec = tile_batch / vector_lanes(p.isa);
    if (p.n_vec < 1 || p.n_vec > max_vec)
        throw std::invalid_argument("jit spmm_scatter: n_vec must be in [1, "
                                    + std::to_string(max_vec) + "] on " + to_string(p.isa)
                                    + ", got " + std::to_string(p.n_vec));
    if (p.avx_vnni && (p.isa != cpu_isa::avx2 || p.dtype != sparse_dtype::s8))
        throw std::invalid_argument(
                "jit spmm_scatter: avx_vnni applies to the avx2 s8 kernel only");
    check_s8_word(p, "spmm_scatter", true);
}

} // namespace

template <cpu_isa isa>
jit_uni_spmm_scatter_kernel_t<isa>::jit_uni_spmm_scatter_kernel_t(
        const sparse_kernel_params &params)
    : jit_spmm_scatter_kernel("spmm_scatter", params) {
    check_params(params);
    finish();
}

template <cpu_isa isa> void jit_uni_spmm_scatter_kernel_t<isa>::generate() {
    using traits = cpu_isa_traits<isa>;
    using Vmm = typename traits::Vmm;
    constexpr bool avx512 = traits::avx512;
    constexpr int vlen = traits::vlen;
    const int nv = params_.n_vec;
    const bool s8 = params_.dtype == sparse_dtype::s8;
    const bool native = native_dot(isa, params_.dtype, params_.avx_vnni);
    // Pairs (s8_word::pair, without VNNI): source rows hold 2 channels per
    // batch lane as u16 (x + 128), the weights two int16 per dword: one
    // vpmaddwd (exact) and one vpaddd per vector, where a quad's emulation
    // takes 7 after its row's nibble split.
    const bool pairs = s8 && params_.word == s8_word::pair;
    const bool emulated = s8 && !native && !pairs;
    // AVX-512 keeps the source row in registers (split into nibbles for the
    // emulated s8 dot products) and takes two entries per step; AVX2 has 16
    // registers and no embedded broadcast: one entry per step, the source
    // row read from L1 (it was just loaded) per use.
    const bool x_in_regs = avx512;
    const int unroll = avx512 ? 2 : 1;

    // avx512: 0..3 source row, 4..11 its nibbles, 12..19 destination
    //         temporaries (entry u, vector v), 20/21 weights, 22 ones,
    //         23 nibble mask, 24/25 products, 26 zero.
    // avx2:   0 destination temporary, 1 weight, 2 source vector, 3/4
    //         nibbles, 5 ones, 6 nibble mask, 7/8 products, 9 zero.
    auto x = [](int v) { return Vmm(v); };
    auto x_lo = [](int v) { return Vmm(4 + v); };
    auto x_hi = [](int v) { return Vmm(8 + v); };
    auto t = [&](int u, int v) { return avx512 ? Vmm(12 + u * 4 + v) : Vmm(0); };
    auto w_reg = [&](int u) { return avx512 ? Vmm(20 + u) : Vmm(1); };
    const Vmm x_tmp(2), lo_tmp(3), hi_tmp(4);
    const Vmm ones16(avx512 ? 22 : 5), nibble_mask(avx512 ? 23 : 6), p_lo(avx512 ? 24 : 7),
            p_hi(avx512 ? 25 : 8), zero(avx512 ? 26 : 9);

    const Reg64 values = r8, entry_offsets = r9, src_offsets = r10, row_ptr = r11, s = r12,
                src = r13, dst = r14, pix_w = r15, i = rax, end = rdx, tmp = rcx, x_row = rbx;
    const Reg64 off[2] = {rsi, rbp};
    const Address params = qword[rsp], pix_h_left = qword[rsp + 8], src_pix_row = qword[rsp + 16],
                  dst_pix_row = qword[rsp + 24], n_src = qword[rsp + 32];
    auto field = [&](size_t offset) { return qword[tmp + offset]; }; // after mov(tmp, params)
    constexpr size_t pix = offsetof(spmm_scatter_call_params, pix);

    // dst row of entry u += its value * the source row.
    auto entry = [&](int u) {
        const Address w_mem = dword[values + i * 4 + u * 4];
        if (s8 && !(avx512 && native)) vpbroadcastd(w_reg(u), w_mem);
        if (!s8 && !avx512) vbroadcastss(w_reg(u), w_mem);
        for (int v = 0; v < nv; ++v) {
            const Address d = ptr[dst + off[u] + v * vlen];
            vmovups(t(u, v), d);
            if (!s8) {
                if (avx512)
                    vfmadd231ps(t(u, v), x(v), ptr_b[values + i * 4 + u * 4]);
                else
                    vfmadd231ps(t(u, v), w_reg(u), ptr[x_row + v * vlen]);
            } else if (pairs) {
                const Vmm &x_v = x_in_regs ? x(v) : x_tmp;
                if (!x_in_regs) vmovups(x_tmp, ptr[x_row + v * vlen]);
                vpmaddwd(p_lo, x_v, w_reg(u));
                vpaddd(t(u, v), t(u, v), p_lo);
            } else if (native) {
                if (avx512) {
                    vpdpbusd(t(u, v), x(v), ptr_b[values + i * 4 + u * 4]);
                } else {
                    vmovups(x_tmp, ptr[x_row + v * vlen]);
                    vpdpbusd(t(u, v), x_tmp, w_reg(u), VexEncoding);
                }
            } else if (x_in_regs) {
                emit_dot_u8s8_nibbles(*this, t(u, v), x_lo(v), x_hi(v), w_reg(u), ones16, p_lo,
                                      p_hi, true);
            } else {
                vmovups(x_tmp, ptr[x_row + v * vlen]);
                emit_split_nibbles(*this, x_tmp, lo_tmp, hi_tmp, nibble_mask);
                emit_dot_u8s8_nibbles(*this, t(u, v), lo_tmp, hi_tmp, w_reg(u), ones16, p_lo, p_hi,
                                      true);
            }
            vmovups(d, t(u, v));
        }
    };

    Label constants, pix_h_loop, pix_w_loop, zero_loop, zero_done, src_loop, step_loop, single_loop,
            next_src, srcs_done, done;
    preamble();
    sub(rsp, 40);
    mov(params, rdi);
    mov(tmp, rdi);
    mov(values, field(offsetof(spmm_scatter_call_params, values)));
    mov(entry_offsets, field(offsetof(spmm_scatter_call_params, entry_offsets)));
    mov(src_offsets, field(offsetof(spmm_scatter_call_params, src_offsets)));
    mov(row_ptr, field(offsetof(spmm_scatter_call_params, row_ptr)));
    mov(i, field(offsetof(spmm_scatter_call_params, n_src_rows)));
    mov(n_src, i);
    cmp(field(pix + offsetof(pixel_grid, n_h)), 1);
    jl(done, T_NEAR);
    cmp(field(pix + offsetof(pixel_grid, n_w)), 1);
    jl(done, T_NEAR);
    if (emulated) emit_int8_dot_constants(*this, ones16, nibble_mask, constants);
    if (avx512)
        vpxord(zero, zero, zero);
    else
        vpxor(zero, zero, zero);
    mov(src, field(offsetof(spmm_scatter_call_params, src_tile)));
    mov(dst, field(offsetof(spmm_scatter_call_params, dst_tile)));
    mov(src_pix_row, src);
    mov(dst_pix_row, dst);
    mov(i, field(pix + offsetof(pixel_grid, n_h)));
    mov(pix_h_left, i);

    L(pix_h_loop);
    mov(tmp, params);
    mov(pix_w, field(pix + offsetof(pixel_grid, n_w)));

    L(pix_w_loop);
    // The pixel's destination rows start at zero.
    mov(tmp, params);
    mov(i, field(offsetof(spmm_scatter_call_params, n_dst_rows)));
    mov(end, field(offsetof(spmm_scatter_call_params, dst_row_stride)));
    mov(x_row, dst);
    L(zero_loop);
    test(i, i);
    jz(zero_done, T_NEAR);
    for (int v = 0; v < nv; ++v)
        vmovups(ptr[x_row + v * vlen], zero);
    add(x_row, end);
    dec(i);
    jmp(zero_loop);
    L(zero_done);

    xor_(s, s);
    L(src_loop);
    cmp(s, n_src);
    jge(srcs_done, T_NEAR);
    mov(i, ptr[row_ptr + s * 8]);
    mov(end, ptr[row_ptr + s * 8 + 8]);
    cmp(i, end);
    jge(next_src, T_NEAR);
    movsxd(x_row, dword[src_offsets + s * 4]);
    add(x_row, src);
    if (x_in_regs) {
        for (int v = 0; v < nv; ++v) {
            vmovups(x(v), ptr[x_row + v * vlen]);
            if (emulated) emit_split_nibbles(*this, x(v), x_lo(v), x_hi(v), nibble_mask);
        }
    }
    if (unroll > 1) {
        L(step_loop);
        lea(tmp, ptr[i + unroll]);
        cmp(tmp, end);
        jg(single_loop, T_NEAR);
        for (int u = 0; u < unroll; ++u)
            movsxd(off[u], dword[entry_offsets + i * 4 + u * 4]);
        for (int u = 0; u < unroll; ++u)
            entry(u);
        add(i, unroll);
        jmp(step_loop);
    }
    L(single_loop);
    cmp(i, end);
    jge(next_src, T_NEAR);
    movsxd(off[0], dword[entry_offsets + i * 4]);
    entry(0);
    inc(i);
    jmp(single_loop);
    L(next_src);
    inc(s);
    jmp(src_loop, T_NEAR);

    L(srcs_done);
    mov(tmp, params);
    add(src, field(pix + offsetof(pixel_grid, src_w)));
    add(dst, field(pix + offsetof(pixel_grid, dst_w)));
    dec(pix_w);
    jnz(pix_w_loop, T_NEAR);
    mov(src, src_pix_row);
    add(src, field(pix + offsetof(pixel_grid, src_h)));
    mov(src_pix_row, src);
    mov(dst, dst_pix_row);
    add(dst, field(pix + offsetof(pixel_grid, dst_h)));
    mov(dst_pix_row, dst);
    dec(pix_h_left);
    jnz(pix_h_loop, T_NEAR);

    L(done);
    add(rsp, 40);
    postamble();
    if (emulated) emit_int8_dot_constant_table(*this, constants);
}

template class jit_uni_spmm_scatter_kernel_t<cpu_isa::avx2>;
template class jit_uni_spmm_scatter_kernel_t<cpu_isa::avx512_core>;
template class jit_uni_spmm_scatter_kernel_t<cpu_isa::avx512_core_vnni>;

std::shared_ptr<const jit_spmm_scatter_kernel>
spmm_scatter_kernel(const sparse_kernel_params &params) {
    static runtime::lru_cache<sparse_kernel_params, jit_spmm_scatter_kernel,
                              sparse_kernel_params_hash>
            cache("jit_code:spmm_scatter");
    return cache.get_or_create(params, [&] {
        return make_for_isa<jit_uni_spmm_scatter_kernel_t, jit_spmm_scatter_kernel>(params,
                                                                                    "spmm_scatter");
    });
}

} // namespace qsp::jit
