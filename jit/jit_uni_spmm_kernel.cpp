#include "jit/jit_uni_spmm_kernel.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "jit/jit_int8_dot.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {

void check_params(const sparse_kernel_params &p) {
    const int max_vec = tile_batch / vector_lanes(p.isa);
    if (p.isa == cpu_isa::ref)
        throw std::invalid_argument("jit spmm: the reference tier has no generated code");
    if (p.n_vec < 1 || p.n_vec > max_vec)
        throw std::invalid_argument("jit spmm: n_vec must be in [1, " + std::to_string(max_vec)
                                    + "] on " + to_string(p.isa) + ", got "
                                    + std::to_string(p.n_vec));
    if (p.avx_vnni && (p.isa != cpu_isa::avx2 || p.dtype != sparse_dtype::s8))
        throw std::invalid_argument("jit spmm: avx_vnni applies to the avx2 s8 kernel only");
}

} // namespace

template <cpu_isa isa>
jit_uni_spmm_kernel_t<isa>::jit_uni_spmm_kernel_t(const sparse_kernel_params &params)
    : jit_spmm_kernel("spmm", params) {
    check_params(params);
    finish();
}

template <cpu_isa isa> void jit_uni_spmm_kernel_t<isa>::generate() {
    constexpr bool avx512 = isa != cpu_isa::avx2;
    using Vmm = typename std::conditional<avx512, Zmm, Ymm>::type;
    constexpr int vlen = avx512 ? 64 : 32;
    const int nv = params_.n_vec;
    const bool s8 = params_.dtype == sparse_dtype::s8;
    const bool native_dot = s8 && (isa == cpu_isa::avx512_core_vnni || params_.avx_vnni);

    // Entries per step of the main loop, and accumulator sets alternating
    // between consecutive entries so that the multiply-add latency (4
    // cycles) does not serialise a row. AVX2 has 16 registers: one set of up
    // to 8 accumulators already hides the latency, and the emulated s8 dot
    // products need the rest, so that kernel takes one entry per step.
    const int unroll = (!avx512 && s8) ? 1 : 4;
    const int sets = avx512 ? 2 : 1;
    auto acc = [&](int u, int v) { return Vmm((u % sets) * nv + v); };
    // avx512: 0..7 accumulators, 8..11 f32 broadcasts, 12..19 s8 sources,
    //         20..23 s8 weights, 24..29 nibbles, constants, products.
    // avx2:   0..7 accumulators, 8..11 f32 broadcasts; s8: 8 source,
    //         9 weights, 10..15 nibbles, constants, products.
    auto bcast = [](int u) { return Vmm(8 + u); };
    auto src_reg = [&](int u, int v) { return avx512 ? Vmm(12 + (u % 2) * 4 + v) : Vmm(8); };
    auto w_reg = [&](int u) { return avx512 ? Vmm(20 + u) : Vmm(9); };
    const Vmm x_lo(avx512 ? 24 : 10), x_hi(avx512 ? 25 : 11), ones16(avx512 ? 26 : 14),
            nibble_mask(avx512 ? 27 : 15), t_lo(avx512 ? 28 : 12), t_hi(avx512 ? 29 : 13);

    // General registers; the group counter and row stride live in a small
    // stack frame.
    const Reg64 values = r8, offsets = r9, group_ptr = r10, row = r11, row_end = r12, src = r13,
                dst = r14, n_groups = r15, i = rax, end = rdx, tmp = rcx;
    const Reg64 off[4] = {rsi, rdi, rbx, rbp}; // rdi (the params) is saved in the frame
    const Address params = qword[rsp], group = qword[rsp + 8], dst_row_stride = qword[rsp + 16],
                  row_begin = qword[rsp + 24];
    auto field = [&](size_t offset) { return qword[tmp + offset]; }; // after mov(tmp, params)
    using cp = spmm_call_params;

    // One entry u of this step: its weight at values[i + u], its source row
    // at src + off[u].
    auto entry = [&](int u) {
        const Address w_mem = dword[values + i * 4 + u * 4];
        if (!s8) {
            vbroadcastss(bcast(u), w_mem);
            for (int v = 0; v < nv; ++v)
                vfmadd231ps(acc(u, v), bcast(u), ptr[src + off[u] + v * vlen]);
            return;
        }
        if (avx512 && native_dot) {
            for (int v = 0; v < nv; ++v) {
                vmovups(src_reg(u, v), ptr[src + off[u] + v * vlen]);
                vpdpbusd(acc(u, v), src_reg(u, v), ptr_b[values + i * 4 + u * 4]);
            }
            return;
        }
        vpbroadcastd(w_reg(u), w_mem);
        for (int v = 0; v < nv; ++v) {
            vmovups(src_reg(u, v), ptr[src + off[u] + v * vlen]);
            if (native_dot) {
                vpdpbusd(acc(u, v), src_reg(u, v), w_reg(u), VexEncoding);
            } else {
                emit_split_nibbles(*this, src_reg(u, v), x_lo, x_hi, nibble_mask);
                emit_dot_u8s8_nibbles(*this, acc(u, v), x_lo, x_hi, w_reg(u), ones16, t_lo, t_hi,
                                      true);
            }
        }
    };
    auto zero = [&](const Vmm &v) {
        if (s8)
            vpxor(Xmm(v.getIdx()), Xmm(v.getIdx()), Xmm(v.getIdx())); // VEX: zeroes the upper bits
        else
            vxorps(Xmm(v.getIdx()), Xmm(v.getIdx()), Xmm(v.getIdx()));
    };

    // Groups outside, rows inside: a group's source rows stay in L1 while
    // every row of the part uses them.
    Label constants, group_loop, row_loop, rows_done, first_group, sums_ready, step_loop,
            single_loop, store, done;
    preamble();
    sub(rsp, 32);
    mov(params, rdi);
    mov(tmp, rdi);
    mov(values, field(offsetof(cp, values)));
    mov(offsets, field(offsetof(cp, src_offsets)));
    mov(group_ptr, field(offsetof(cp, group_ptr)));
    mov(n_groups, field(offsetof(cp, n_groups)));
    mov(row_end, field(offsetof(cp, row_end)));
    mov(i, field(offsetof(cp, row_begin)));
    mov(row_begin, i);
    mov(i, field(offsetof(cp, dst_row_stride)));
    mov(dst_row_stride, i);
    mov(src, field(offsetof(cp, src_tile)));
    mov(dst, field(offsetof(cp, dst_tile)));
    if (s8 && !native_dot) emit_int8_dot_constants(*this, ones16, nibble_mask, constants);
    mov(qword[rsp + 8], 0);

    L(group_loop);
    mov(tmp, group);
    cmp(tmp, n_groups);
    jge(done, T_NEAR);
    mov(row, row_begin);

    L(row_loop);
    cmp(row, row_end);
    jge(rows_done, T_NEAR);
    // The sums start at zero in the first group, from the row's stored
    // partial sums in the others.
    for (int s = 1; s < sets; ++s)
        for (int v = 0; v < nv; ++v)
            zero(acc(s, v));
    cmp(group, 0);
    je(first_group, T_NEAR);
    mov(tmp, row);
    imul(tmp, dst_row_stride);
    for (int v = 0; v < nv; ++v)
        vmovups(acc(0, v), ptr[dst + tmp + v * vlen]);
    jmp(sums_ready, T_NEAR);
    L(first_group);
    for (int v = 0; v < nv; ++v)
        zero(acc(0, v));
    L(sums_ready);
    // entries [group_ptr[row * (n_groups + 1) + group], ... + 1)
    mov(i, row);
    imul(i, n_groups);
    add(i, row);
    add(i, group);
    mov(end, ptr[group_ptr + i * 8 + 8]);
    mov(i, ptr[group_ptr + i * 8]);

    if (unroll > 1) {
        L(step_loop);
        lea(tmp, ptr[i + unroll]);
        cmp(tmp, end);
        jg(single_loop, T_NEAR);
        for (int u = 0; u < unroll; ++u)
            movsxd(off[u], dword[offsets + i * 4 + u * 4]);
        for (int u = 0; u < unroll; ++u)
            entry(u);
        add(i, unroll);
        jmp(step_loop);
    }

    L(single_loop);
    cmp(i, end);
    jge(store, T_NEAR);
    movsxd(off[0], dword[offsets + i * 4]);
    entry(0);
    inc(i);
    jmp(single_loop);

    L(store);
    mov(tmp, row);
    imul(tmp, dst_row_stride);
    add(tmp, dst);
    for (int v = 0; v < nv; ++v) {
        if (sets > 1) {
            if (s8)
                vpaddd(acc(0, v), acc(0, v), acc(1, v));
            else
                vaddps(acc(0, v), acc(0, v), acc(1, v));
        }
        vmovups(ptr[tmp + v * vlen], acc(0, v));
    }
    inc(row);
    jmp(row_loop, T_NEAR);

    L(rows_done);
    inc(group);
    jmp(group_loop, T_NEAR);

    L(done);
    add(rsp, 32);
    postamble();
    if (s8 && !native_dot) emit_int8_dot_constant_table(*this, constants);
}

template class jit_uni_spmm_kernel_t<cpu_isa::avx2>;
template class jit_uni_spmm_kernel_t<cpu_isa::avx512_core>;
template class jit_uni_spmm_kernel_t<cpu_isa::avx512_core_vnni>;

std::shared_ptr<const jit_spmm_kernel> spmm_kernel(const sparse_kernel_params &params) {
    static runtime::lru_cache<sparse_kernel_params, jit_spmm_kernel, sparse_kernel_params_hash>
            cache("jit_code:spmm");
    return cache.get_or_create(params, [&] {
        return make_for_isa<jit_uni_spmm_kernel_t, jit_spmm_kernel>(params, "spmm");
    });
}

} // namespace qsp::jit
