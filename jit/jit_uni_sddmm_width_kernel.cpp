#include "jit/jit_uni_sddmm_width_kernel.hpp"

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "jit/cpu_isa_traits.hpp"
#include "jit/jit_uni_spmm_width_kernel.hpp"
#include "jit/jit_width_row_walk.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {

// How the entries are unrolled: `entries` at a time, each summed in
// `chains` independent registers (multiply-add latency hidden).
struct unroll_t {
    int entries, chains;
};
unroll_t unroll_for(cpu_isa isa, bool widened) {
    if (widened) return {2, 1}; // the products' temporaries serialise anyway
    return isa >= cpu_isa::avx512_core ? unroll_t{4, 2} : unroll_t{2, 2};
}
// The unroll a kernel holding `dy_vectors` dY vectors uses: the fewest sums
// above, or as many entries (up to 4, two sums each) as the registers left
// allow. A multiply-add waits 4 cycles on its sum and two issue per cycle,
// so fewer than 8 independent sums leave the multiply-add ports idle.
unroll_t unroll_for(cpu_isa isa, bool widened, int dy_vectors) {
    const unroll_t fewest = unroll_for(isa, widened);
    if (widened) return fewest;
    return {std::max(fewest.entries, std::min(4, (vector_registers(isa) - dy_vectors) / 2)), 2};
}

void check_params(const sparse_kernel_params &p) {
    const int lanes = vector_lanes(p.isa);
    if (p.n_rows < 1 || p.n_rows > width_max_rows)
        throw std::invalid_argument("jit sddmm_width: n_rows must be in [1, "
                                    + std::to_string(width_max_rows) + "], got "
                                    + std::to_string(p.n_rows));
    const int max_dy = sddmm_width_max_dy_vectors(p.isa, p.dtype, p.avx_vnni);
    if (p.n_vec < 1 || p.n_rows * p.n_vec > max_dy)
        throw std::invalid_argument("jit sddmm_width: n_rows * n_vec must be in [1, "
                                    + std::to_string(max_dy) + "] for " + p.str());
    check_width_row_step(p, "sddmm_width");
    if (p.tail < 0 || p.tail >= lanes || (p.dtype == sparse_dtype::s8 && p.tail != 0))
        throw std::invalid_argument("jit sddmm_width: tail must be in [0, " + std::to_string(lanes)
                                    + ") (s8: 0, its dY rows are padded), got "
                                    + std::to_string(p.tail));
    if (p.avx_vnni && (p.isa != cpu_isa::avx2 || p.dtype != sparse_dtype::s8))
        throw std::invalid_argument("jit sddmm_width: avx_vnni applies to the avx2 s8 kernel only");
    check_s8_word(p, "sddmm_width", false);
    if (p.shifts != 0
        && (p.dtype != sparse_dtype::f32 || p.tail == 0 || p.shifts < 1
            || p.tail + p.shifts - 1 > lanes || p.row_step % (4 * lanes) != 0))
        throw std::invalid_argument(
                "jit sddmm_width: shifts (aligned sources) need f32, rows whose last vector's "
                "real lanes stay in it at every shift (tail + shifts - 1 <= "
                + std::to_string(lanes) + ") and a row step of whole vectors, got " + p.str());
}

} // namespace

int sddmm_width_max_dy_vectors(cpu_isa isa, sparse_dtype dtype, bool avx_vnni) {
    const int regs = vector_registers(isa);
    if (emulated_dot(isa, dtype, avx_vnni)) // widened: two halves of each dY vector, 2 sums,
                                            // 2 products (and 2 spare: the blocks stay as
                                            // they were with the nibble emulation)
        return (regs - 6) / 2;
    const unroll_t u = unroll_for(isa, false);
    return regs - u.entries * u.chains;
}

template <cpu_isa isa>
jit_uni_sddmm_width_kernel_t<isa>::jit_uni_sddmm_width_kernel_t(const sparse_kernel_params &params)
    : jit_sddmm_width_kernel("sddmm_width", params, max_code_bytes * std::max(1, params.shifts)) {
    check_params(params);
    finish();
}

template <cpu_isa isa> void jit_uni_sddmm_width_kernel_t<isa>::generate() {
    using traits = cpu_isa_traits<isa>;
    using Vmm = typename traits::Vmm;
    constexpr bool avx512 = traits::avx512;
    constexpr int vlen = traits::vlen, n_regs = traits::n_vregs;
    const int nv = params_.n_vec, tail = params_.tail;
    const bool s8 = params_.dtype == sparse_dtype::s8;
    // Without VNNI (AVX2, avx512_core) the operands are widened to 16 bits
    // instead of emulating vpdpbusd: each dY vector's two halves held as
    // u16, per x vector two vpmovsxbw, two vpmaddwd, two vpaddd (the nibble
    // emulation took 11 per vector). A dword lane then sums 2 columns of
    // each half, still 4 products per dY vector.
    const bool widened = emulated_dot(isa, params_.dtype, params_.avx_vnni);
    const unroll_t un = unroll_for(isa, widened, params_.n_rows * params_.n_vec);

    // Vector registers: dY from 0 up (widened: its two halves, interleaved),
    // sums from the top, then the two products of the widened operands.
    auto g = [&](int k) { return Vmm(widened ? 2 * k : k); };
    auto g_hi = [&](int k) { return Vmm(2 * k + 1); };
    auto sum = [&](int u, int c) { return Vmm(n_regs - 1 - (u * un.chains + c)); };
    const int helpers = n_regs - un.entries * un.chains;
    const Vmm p_lo(helpers - 3), p_hi(helpers - 4);

    // General registers; rdi keeps the params; the block's position and the
    // row's end live in a small stack frame.
    const Reg64 param = rdi, offsets = r9, group_ptr = r10, i = rax, row = r15, tmp = rcx, pp = rbx;
    const Reg64 off[4] = {rsi, rbp, r8, rdx};
    const Reg64 xb = r11, runs_ptr = r12; // the block's x, output row 0; the group's runs
    // a group's entries: one run, or one per shift (params_.shifts)
    const int runs = std::max(1, params_.shifts);
    const Address rows_left = qword[rsp], x_blk = qword[rsp + 8], dy_blk = qword[rsp + 16],
                  end = qword[rsp + 24], group = qword[rsp + 32];
    auto field = [&](size_t offset) { return qword[param + offset]; };
    using cp = sddmm_width_call_params;

    auto zero = [&](const Vmm &v) {
        if (avx512)
            vpxord(v, v, v);
        else
            vpxor(v, v, v);
    };
    auto add_vec = [&](const Vmm &a, const Vmm &b) {
        if (s8)
            vpaddd(a, a, b);
        else
            vaddps(a, a, b);
    };
    Label mask_table, rotate_table;

    // `count` entries from i: their sums start from their partials and add
    // every dY vector times the entry's x window.
    auto entries = [&](int count, int rows) {
        for (int u = 0; u < count; ++u)
            movsxd(off[u], dword[offsets + i * 4 + u * 4]);
        for (int u = 0; u < count; ++u) {
            vmovups(sum(u, 0), ptr[pp + u * vlen]);
            for (int c = 1; c < un.chains; ++c)
                zero(sum(u, c));
        }
        for (int r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) {
                const int k = r * nv + v;
                for (int u = 0; u < count; ++u) {
                    const int64_t at = r * params_.row_step + v * vlen;
                    const Address x = ptr[xb + off[u] + at];
                    const Vmm &s = sum(u, k % un.chains);
                    if (!s8) {
                        vfmadd231ps(s, g(k), x);
                    } else if (widened) {
                        const Address x_hi = ptr[xb + off[u] + at + vlen / 2];
                        vpmovsxbw(p_lo, x);
                        vpmaddwd(p_lo, p_lo, g(k));
                        vpaddd(s, s, p_lo);
                        vpmovsxbw(p_hi, x_hi);
                        vpmaddwd(p_hi, p_hi, g_hi(k));
                        vpaddd(s, s, p_hi);
                    } else if (avx512)
                        vpdpbusd(s, g(k), x);
                    else
                        vpdpbusd(s, g(k), x, VexEncoding);
                }
            }
        for (int u = 0; u < count; ++u) {
            for (int c = 1; c < un.chains; ++c)
                add_vec(sum(u, 0), sum(u, c));
            vmovups(ptr[pp + u * vlen], sum(u, 0));
        }
    };

    // One block of `rows` output rows: every group, and in it every channel
    // of the row range (the group's x rows stay in L1 across channels).
    auto block = [&](int rows) {
        Label groups_loop, groups_done, row_loop, rows_done;
        mov(xb, x_blk);
        mov(group, 0);
        L(groups_loop);
        mov(tmp, group);
        cmp(tmp, field(offsetof(cp, n_groups)));
        jge(groups_done, T_NEAR);
        mov(row, field(offsetof(cp, row_begin)));
        L(row_loop);
        cmp(row, field(offsetof(cp, row_end)));
        jge(rows_done, T_NEAR);
        // The channel's dY rows of the block into registers.
        mov(tmp, row);
        imul(tmp, field(offsetof(cp, dy_channel_stride)));
        add(tmp, dy_blk);
        if (!avx512 && tail != 0) vmovups(sum(0, 0), ptr[rip + mask_table]);
        for (int r = 0; r < rows; ++r) {
            if (r > 0) add(tmp, field(offsetof(cp, dy_row_stride)));
            for (int v = 0; v < nv; ++v) {
                const int k = r * nv + v;
                const Address a = ptr[tmp + v * vlen];
                const bool masked = v == nv - 1 && tail != 0;
                if (widened) { // s8 rows are zero-padded: never masked
                    vpmovzxbw(g(k), ptr[tmp + v * vlen]);
                    vpmovzxbw(g_hi(k), ptr[tmp + v * vlen + vlen / 2]);
                    continue;
                }
                if (!masked)
                    vmovups(g(k), a);
                else if (avx512)
                    vmovups(g(k) | k1 | T_z, a);
                else
                    vmaskmovps(g(k), sum(0, 0), a);
            }
        }
        // the runs of entries [runs_ptr[s], runs_ptr[s + 1]) for s in [0, runs)
        emit_group_runs(*this, runs_ptr, group_ptr, field(offsetof(cp, n_groups)), row, group, i,
                        tmp, runs);
        for (int s = 0; s < runs; ++s) {
            Label group_loop, single_loop, singles, run_done;
            if (s > 0) {
                // Aligned sources: run s reads x from s lanes past its
                // aligned offset, and the lanes are summed whatever their
                // order, so the dY rows move up a lane instead, each
                // vector taking the lane its neighbour below gives up
                // (from the top down: that one still holds it), the first
                // a zero (k2); the last vector's top lane is past its real
                // ones at every shift (check_params), so nothing is lost.
                if (avx512) {
                    for (int r = 0; r < rows; ++r) {
                        for (int v = nv - 1; v > 0; --v)
                            valignd(g(r * nv + v), g(r * nv + v), g(r * nv + v - 1), vlen / 4 - 1);
                        valignd(g(r * nv) | k2 | T_z, g(r * nv), g(r * nv), vlen / 4 - 1);
                    }
                } else {
                    // AVX2: each vector rotated up a lane (vpermps), lane
                    // 0 then blended from its neighbour's rotation, or
                    // zero; in the sums' registers, free between entries
                    const Vmm index = sum(0, 0), zeros = sum(1, 1);
                    vmovups(index, ptr[rip + rotate_table]);
                    vxorps(zeros, zeros, zeros);
                    for (int r = 0; r < rows; ++r) {
                        Vmm rotated = sum(0, 1), below = sum(1, 0);
                        vpermps(rotated, index, g(r * nv + nv - 1));
                        for (int v = nv - 1; v > 0; --v) {
                            vpermps(below, index, g(r * nv + v - 1));
                            vblendps(g(r * nv + v), rotated, below, 1);
                            std::swap(rotated, below);
                        }
                        vblendps(g(r * nv), rotated, zeros, 1);
                    }
                }
            }
            mov(i, ptr[runs_ptr + s * 8]);
            mov(tmp, ptr[runs_ptr + s * 8 + 8]);
            mov(end, tmp);
            mov(pp, i);
            shl(pp, avx512 ? 6 : 5);
            add(pp, field(offsetof(cp, partial)));
            L(group_loop);
            lea(tmp, ptr[i + un.entries]);
            cmp(tmp, end);
            jg(single_loop, T_NEAR);
            entries(un.entries, rows);
            add(i, un.entries);
            add(pp, un.entries * vlen);
            jmp(group_loop, T_NEAR);
            L(single_loop);
            if (un.entries > 2) { // at most one pair left: two sums per chain beat one
                Label no_pair;
                lea(tmp, ptr[i + 2]);
                cmp(tmp, end);
                jg(no_pair, T_NEAR);
                entries(2, rows);
                add(i, 2);
                add(pp, 2 * vlen);
                L(no_pair);
            }
            L(singles);
            cmp(i, end);
            jge(run_done, T_NEAR);
            entries(1, rows);
            inc(i);
            add(pp, vlen);
            jmp(singles, T_NEAR);
            L(run_done);
        }
        inc(row);
        jmp(row_loop, T_NEAR);
        L(rows_done);
        inc(group);
        jmp(groups_loop, T_NEAR);
        L(groups_done);
    };
    preamble();
    sub(rsp, 40);
    mov(offsets, field(offsetof(cp, x_offsets)));
    mov(group_ptr, field(offsetof(cp, group_ptr)));
    if (avx512 && tail != 0) {
        mov(tmp.cvt32(), (1 << tail) - 1);
        kmovw(k1, tmp.cvt32());
    }
    if (avx512 && params_.shifts > 1) { // every lane but 0
        mov(tmp.cvt32(), 0xfffe);
        kmovw(k2, tmp.cvt32());
    }
    emit_width_row_walk(*this, param,
                        {rows_left, x_blk, dy_blk, tmp, offsetof(cp, n_out_rows), offsetof(cp, x),
                         offsetof(cp, dy), offsetof(cp, dy_row_stride), params_.row_step},
                        params_.n_rows, block);
    add(rsp, 40);
    postamble();
    if (!avx512 && tail != 0) {
        align(32);
        L(mask_table);
        for (int l = 0; l < 8; ++l)
            dd(l < tail ? 0xffffffffu : 0u);
    }
    if (!avx512 && params_.shifts > 1) { // lane l takes lane l - 1 (lane 0: lane 7)
        align(32);
        L(rotate_table);
        for (int l = 0; l < 8; ++l)
            dd(static_cast<uint32_t>((l + 7) % 8));
    }
}

template class jit_uni_sddmm_width_kernel_t<cpu_isa::avx2>;
template class jit_uni_sddmm_width_kernel_t<cpu_isa::avx512_core>;
template class jit_uni_sddmm_width_kernel_t<cpu_isa::avx512_core_vnni>;

std::shared_ptr<const jit_sddmm_width_kernel>
sddmm_width_kernel(const sparse_kernel_params &params) {
    static runtime::lru_cache<sparse_kernel_params, jit_sddmm_width_kernel,
                              sparse_kernel_params_hash>
            cache("jit_code:sddmm_width");
    return cache.get_or_create(params, [&] {
        return make_for_isa<jit_uni_sddmm_width_kernel_t, jit_sddmm_width_kernel>(params,
                                                                                  "sddmm_width");
    });
}

} // namespace qsp::jit
