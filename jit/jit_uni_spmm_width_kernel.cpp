#include "jit/jit_uni_spmm_width_kernel.hpp"

#include <algorithm>
#include <cstddef>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "jit/cpu_isa_traits.hpp"
#include "jit/jit_int8_dot.hpp"
#include "jit/jit_width_row_walk.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {

void check_params(const sparse_kernel_params &p) {
    const int lanes = vector_lanes(p.isa);
    if (p.n_rows < 1 || p.n_rows > width_max_rows)
        throw std::invalid_argument("jit spmm_width: n_rows must be in [1, "
                                    + std::to_string(width_max_rows) + "], got "
                                    + std::to_string(p.n_rows));
    const int max_acc = spmm_width_max_accumulators(p.isa, p.dtype, p.avx_vnni, p.word);
    if (p.n_vec < 1 || p.n_rows * p.n_vec > max_acc)
        throw std::invalid_argument("jit spmm_width: n_rows * n_vec must be in [1, "
                                    + std::to_string(max_acc) + "] for " + p.str());
    if (p.tail < 0 || p.tail >= lanes)
        throw std::invalid_argument("jit spmm_width: tail must be in [0, " + std::to_string(lanes)
                                    + "), got " + std::to_string(p.tail));
    check_width_row_step(p, "spmm_width");
    if (p.avx_vnni && (p.isa != cpu_isa::avx2 || p.dtype != sparse_dtype::s8))
        throw std::invalid_argument("jit spmm_width: avx_vnni applies to the avx2 s8 kernel only");
    check_s8_word(p, "spmm_width", true, false);
    if (p.shifts < 0 || p.shifts > lanes)
        throw std::invalid_argument("jit spmm_width: shifts must be in [0, " + std::to_string(lanes)
                                    + "], got " + std::to_string(p.shifts));
    const bool nibbles =
            emulated_dot(p.isa, p.dtype, p.avx_vnni) && p.word == s8_word::quad; // no plan's
    if (p.shifts != 0 && (p.isa < cpu_isa::avx512_core || nibbles || p.row_step % 64 != 0))
        throw std::invalid_argument("jit spmm_width: shifts (aligned sources) need an AVX-512 "
                                    "tier, words other than emulated quads and a row step of "
                                    "whole vectors, got "
                                    + p.str());
}

} // namespace

int spmm_width_max_accumulators(cpu_isa isa, sparse_dtype dtype, bool avx_vnni, s8_word word) {
    const int regs = vector_registers(isa);
    // The weight and two source temporaries (quads: two loads in flight);
    // emulated dot products also hold nibbles, two constants and two
    // products. On AVX2, f32 multiplies from memory and s8 pairs through one
    // product register (renamed on every write: reusing it serialises
    // nothing), so one temporary does (the tail's mask and the s8 epilogue's
    // constants take it outside the entries): the 14th sum makes C3's 14
    // rows two blocks of 7 instead of 5, 5, 4, each entry's weight and
    // offset read twice an image instead of three times (C3's training step
    // 1.01-1.04x f32, 1.02-1.06x s8; docs/benchmarks.md). AVX-512's block
    // statistics take the third register.
    const bool emulated = emulated_dot(isa, dtype, avx_vnni) && word == s8_word::quad;
    if (emulated) return regs - 8;
    const bool pairs = dtype == sparse_dtype::s8 && word == s8_word::pair;
    return regs - ((dtype == sparse_dtype::f32 || pairs) && isa < cpu_isa::avx512_core ? 2 : 3);
}

template <cpu_isa isa>
jit_uni_spmm_width_kernel_t<isa>::jit_uni_spmm_width_kernel_t(const sparse_kernel_params &params)
    : jit_spmm_width_kernel("spmm_width", params, max_code_bytes * std::max(1, params.shifts)) {
    check_params(params);
    finish();
}

template <cpu_isa isa> void jit_uni_spmm_width_kernel_t<isa>::generate() {
    using traits = cpu_isa_traits<isa>;
    using Vmm = typename traits::Vmm;
    constexpr bool avx512 = traits::avx512;
    constexpr int vlen = traits::vlen, n_regs = traits::n_vregs;
    const int nv = params_.n_vec, tail = params_.tail;
    const bool s8 = params_.dtype == sparse_dtype::s8;
    const bool pairs = s8 && params_.word == s8_word::pair; // vpmaddwd on u16 pairs
    const bool emulated = emulated_dot(isa, params_.dtype, params_.avx_vnni) && !pairs;

    // Vector registers: sums from 0 up, the rest from the top.
    auto acc = [nv](int r, int v) { return Vmm(r * nv + v); };
    // tmp1 is the 14th sum of AVX2 f32 and s8 pairs (spmm_width_max_accumulators):
    // only s8 quads and AVX-512 may use it.
    const Vmm w(n_regs - 1), tmp0(n_regs - 2), tmp1(n_regs - 3);
    const Vmm lo(n_regs - 3), hi(n_regs - 4), ones16(n_regs - 5), nibble_mask(n_regs - 6),
            p_lo(n_regs - 7), p_hi(n_regs - 8);

    // General registers; rdi keeps the params, the block's position lives in
    // a small stack frame.
    const Reg64 param = rdi, values = r8, offsets = r9, group_ptr = r10, i = rax, end = rdx,
                off = rsi, row = r15, tmp = rcx, dptr = rbx, src = r11, runs_ptr = r12;
    // a group's entries: one run, or one per shift (params_.shifts)
    const int runs = std::max(1, params_.shifts);
    const Address rows_left = qword[rsp], src_blk = qword[rsp + 8], dst_blk = qword[rsp + 16],
                  group = qword[rsp + 24], first_block = qword[rsp + 32];
    constexpr int frame_bytes = 48;
    auto field = [&](size_t offset) { return qword[param + offset]; };
    using cp = spmm_width_call_params;

    auto zero = [&](const Vmm &v) {
        if (avx512)
            vpxord(v, v, v);
        else
            vpxor(v, v, v);
    };
    Label constants, mask_table;
    auto store = [&](const Vmm &v, const Address &a, bool masked) {
        if (!masked) {
            vmovups(a, v);
        } else if (avx512) {
            vmovups(a | k1, v);
        } else {
            vmovups(tmp0, ptr[rip + mask_table]);
            vmaskmovps(a, tmp0, v);
        }
    };
    auto load = [&](const Vmm &v, const Address &a, bool masked) {
        if (!masked) {
            vmovups(v, a);
        } else if (avx512) {
            vmovups(v | k1 | T_z, a);
        } else {
            vmovups(tmp0, ptr[rip + mask_table]);
            vmaskmovps(v, tmp0, a);
        }
    };

    // The tail vector (the last, partial one of a row) is loaded and stored
    // masked, except, where the call says the destination rows are back to
    // back, in every row of a block but its last: AMD microcodes vmaskmovps
    // (a masked store measured 5.5 ns against 0.7 ns plain), and the lanes
    // past a row land in the next row, loaded before and stored after.
    // AVX-512's masks cost nothing extra: there they stay.
    const bool whole_tails_possible = !avx512 && tail != 0;
    auto masked_tail = [&](int r, int v, int rows, bool whole) {
        return v == nv - 1 && tail != 0 && !(whole && r + 1 < rows);
    };
    // op(sum, its address in dst, masked) for every sum of a block of
    // `rows` rows of the channel at dptr: once, or twice behind the call's
    // dst_rows_back_to_back (whole tails, and masked ones)
    using sum_op = std::function<void(const Vmm &, const Address &, bool)>;
    auto each_sum = [&](int rows, const sum_op &op) {
        auto walk = [&](bool whole) {
            mov(tmp, dptr);
            for (int r = 0; r < rows; ++r) {
                if (r > 0) add(tmp, field(offsetof(cp, dst_row_stride)));
                for (int v = 0; v < nv; ++v)
                    op(acc(r, v), ptr[tmp + v * vlen], masked_tail(r, v, rows, whole));
            }
        };
        if (!whole_tails_possible || rows < 2) {
            walk(false);
            return;
        }
        Label masked, done;
        cmp(field(offsetof(cp, dst_rows_back_to_back)), 0);
        je(masked, T_NEAR);
        walk(true);
        jmp(done, T_NEAR);
        L(masked);
        walk(false);
        L(done);
    };

    // The channel's statistics (width_abi.hpp), AVX-512 only: after the
    // last group, from the values just stored and still in registers (dead
    // after this: the shift is taken in place), with the three vector
    // registers free here (a full block may leave no more). No lane
    // reductions: the call's blocks add into the channel's vectors, which
    // stay in L1 across the call; the order of every sum is fixed by the
    // code, so nothing depends on the thread count.
    auto block_statistics = [&](int rows) {
        if (!avx512) return;
        using ws = width_statistics;
        Label skip, first, ready, first_sums, sums_ready;
        cmp(field(offsetof(cp, statistics)), 0);
        je(skip, T_NEAR);
        mov(tmp, group);
        inc(tmp);
        cmp(tmp, field(offsetof(cp, n_groups)));
        jne(skip, T_NEAR);
        mov(tmp, row);
        imul(tmp, field(offsetof(cp, statistics_channel_stride)));
        add(tmp, field(offsetof(cp, statistics)));
        const Zmm lo(w.getIdx()), hi(tmp0.getIdx()), shift(tmp1.getIdx());
        auto at = [&](size_t offset) { return zword[tmp + offset]; };
        // op(value, masked) over the block's values: the tail vector's lanes
        // past the row are not the block's (merge-masked: left as they were)
        auto each = [&](const std::function<void(const Zmm &, bool)> &op) {
            for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v)
                    op(Zmm(acc(r, v).getIdx()), v == nv - 1 && tail != 0);
        };
        auto infinity = [&](const Zmm &x, bool negative) {
            mov(i.cvt32(), negative ? 0xff800000u : 0x7f800000u);
            vpbroadcastd(x, i.cvt32());
        };
        // the range, of the values themselves
        cmp(first_block, 0);
        jne(first, T_NEAR);
        vmovups(lo, at(offsetof(ws, lowest)));
        vmovups(hi, at(offsetof(ws, highest)));
        jmp(ready, T_NEAR);
        L(first);
        infinity(lo, false);
        infinity(hi, true);
        L(ready);
        each([&](const Zmm &y, bool masked) {
            vminps(masked ? lo | k1 : lo, lo, y);
            vmaxps(masked ? hi | k1 : hi, hi, y);
        });
        vmovups(at(offsetof(ws, lowest)), lo);
        vmovups(at(offsetof(ws, highest)), hi);
        // the sums of the shifted values
        cmp(first_block, 0);
        jne(first_sums, T_NEAR);
        vbroadcastss(shift, dword[tmp + offsetof(ws, shift)]);
        vmovups(lo, at(offsetof(ws, sum)));
        vmovups(hi, at(offsetof(ws, squares)));
        jmp(sums_ready, T_NEAR);
        L(first_sums);
        vbroadcastss(shift, Xmm(acc(0, 0).getIdx()));
        vmovss(dword[tmp + offsetof(ws, shift)], Xmm(shift.getIdx()));
        vpxord(lo, lo, lo);
        vpxord(hi, hi, hi);
        L(sums_ready);
        each([&](const Zmm &y, bool masked) {
            vsubps(y, y, shift);
            vaddps(masked ? lo | k1 : lo, lo, y);
            vfmadd231ps(masked ? hi | k1 : hi, y, y);
        });
        vmovups(at(offsetof(ws, sum)), lo);
        vmovups(at(offsetof(ws, squares)), hi);
        L(skip);
    };

    // Entry i (run `shift`) into the sums of a block of `rows` rows: its
    // weight broadcast, then per vector one multiply-add of its source.
    auto entry = [&](int rows, int shift) {
        movsxd(off, dword[offsets + i * 4]);
        if (s8)
            vpbroadcastd(w, dword[values + i * 4]);
        else
            vbroadcastss(w, dword[values + i * 4]);
        auto x_at = [&](int r, int v) { return ptr[src + off + r * params_.row_step + v * vlen]; };
        // the sum += the weight times source x (in a register, clobbered)
        auto multiply_add = [&](const Vmm &sum, const Vmm &x) {
            if (!s8) {
                vfmadd231ps(sum, w, x);
            } else if (pairs) {
                vpmaddwd(x, w, x);
                vpaddd(sum, sum, x);
            } else {
                vpdpbusd(sum, x, w);
            }
        };
        if (shift != 0) {
            // aligned loads, rotated by `shift` lanes: the vector's real
            // lanes from this one and, past its end, the next, whose load
            // the row's next vector reuses (a 64-byte load crossing a cache
            // line costs Zen 4 about 1.5x an aligned one, a rotated one
            // 1.1x: C3's unaligned source rows were 18 floats, 72 bytes,
            // and nearly every load crossed a line)
            for (int r = 0; r < rows; ++r) {
                Vmm here = tmp0, next = tmp1;
                vmovups(here, x_at(r, 0));
                for (int v = 0; v < nv; ++v) {
                    const int real = v == nv - 1 && tail != 0 ? tail : vlen / 4;
                    if (shift + real <= vlen / 4) {
                        valignd(here, here, here, shift);
                        multiply_add(acc(r, v), here);
                        if (v + 1 < nv) vmovups(here, x_at(r, v + 1));
                        continue;
                    }
                    vmovups(next, x_at(r, v + 1));
                    valignd(here, next, here, shift);
                    multiply_add(acc(r, v), here);
                    std::swap(here, next);
                }
            }
            return;
        }
        for (int r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) {
                const Address x = x_at(r, v);
                if (!s8) {
                    vfmadd231ps(acc(r, v), w, x);
                } else if (pairs) {
                    vpmaddwd(tmp0, w, x);
                    vpaddd(acc(r, v), acc(r, v), tmp0);
                } else if (!emulated) {
                    const Vmm &t = (r * nv + v) % 2 ? tmp1 : tmp0; // two loads in flight
                    vmovups(t, x);
                    if (avx512)
                        vpdpbusd(acc(r, v), t, w);
                    else
                        vpdpbusd(acc(r, v), t, w, VexEncoding);
                } else {
                    vmovups(tmp0, x);
                    emit_split_nibbles(*this, tmp0, lo, hi, nibble_mask);
                    emit_dot_u8s8_nibbles(*this, acc(r, v), lo, hi, w, ones16, p_lo, p_hi, true);
                }
            }
    };

    // One block of `rows` output rows: every group, and in it every channel
    // of the row range.
    auto block = [&](int rows) {
        Label group_loop, groups_done, row_loop, rows_done, first_group, sums_ready, not_last;
        mov(src, src_blk);
        mov(qword[rsp + 24], 0);
        L(group_loop);
        mov(tmp, group);
        cmp(tmp, field(offsetof(cp, n_groups)));
        jge(groups_done, T_NEAR);
        mov(row, field(offsetof(cp, row_begin)));
        L(row_loop);
        cmp(row, field(offsetof(cp, row_end)));
        jge(rows_done, T_NEAR);
        mov(dptr, row);
        imul(dptr, field(offsetof(cp, dst_channel_stride)));
        add(dptr, dst_blk);
        // The sums start from the bias (f32) or zero (s8) in the first
        // group, from what the previous group stored in the others.
        cmp(group, 0);
        je(first_group, T_NEAR);
        each_sum(rows, load);
        jmp(sums_ready, T_NEAR);
        L(first_group);
        if (s8) {
            for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v)
                    zero(acc(r, v));
        } else {
            mov(tmp, field(offsetof(cp, bias)));
            for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v)
                    vbroadcastss(acc(r, v), dword[tmp + row * 4]);
        }
        L(sums_ready);
        // the runs of entries [runs_ptr[s], runs_ptr[s + 1]) for s in [0, runs)
        emit_group_runs(*this, runs_ptr, group_ptr, field(offsetof(cp, n_groups)), row, group, i,
                        tmp, runs);
        for (int s = 0; s < runs; ++s) {
            Label entry_loop, entries_done;
            mov(i, ptr[runs_ptr + s * 8]);
            mov(end, ptr[runs_ptr + s * 8 + 8]);
            L(entry_loop);
            cmp(i, end);
            jge(entries_done, T_NEAR);
            entry(rows, s);
            inc(i);
            jmp(entry_loop);
            L(entries_done);
        }
        if (s8) { // after the last group: float(sum - correction) * scale + bias
            mov(tmp, group);
            inc(tmp);
            cmp(tmp, field(offsetof(cp, n_groups)));
            jne(not_last, T_NEAR);
            // one constant at a time in the two registers the sums leave
            // (pairs use all but those): the same operations per sum, in the
            // same order, so the same bits
            const Vmm corr(tmp0), scale(tmp0), bias(w);
            mov(tmp, field(offsetof(cp, correction)));
            vpbroadcastd(corr, dword[tmp + row * 4]);
            for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v) {
                    vpsubd(acc(r, v), acc(r, v), corr);
                    vcvtdq2ps(acc(r, v), acc(r, v));
                }
            mov(tmp, field(offsetof(cp, scale)));
            vbroadcastss(scale, dword[tmp + row * 4]);
            mov(tmp, field(offsetof(cp, bias)));
            vbroadcastss(bias, dword[tmp + row * 4]);
            for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v) {
                    // two roundings, as the scheme states (not one fused)
                    vmulps(acc(r, v), acc(r, v), scale);
                    vaddps(acc(r, v), acc(r, v), bias);
                }
            L(not_last);
        }
        each_sum(rows, store);
        block_statistics(rows);
        inc(row);
        jmp(row_loop, T_NEAR);
        L(rows_done);
        inc(group);
        jmp(group_loop, T_NEAR);
        L(groups_done);
        if (avx512) mov(first_block, 0);
    };
    preamble();
    sub(rsp, frame_bytes);
    mov(first_block, 1);
    mov(values, field(offsetof(cp, values)));
    mov(offsets, field(offsetof(cp, src_offsets)));
    mov(group_ptr, field(offsetof(cp, group_ptr)));
    if (emulated) emit_int8_dot_constants(*this, ones16, nibble_mask, constants);
    if (avx512 && tail != 0) {
        mov(tmp.cvt32(), (1 << tail) - 1);
        kmovw(k1, tmp.cvt32());
    }
    emit_width_row_walk(*this, param,
                        {rows_left, src_blk, dst_blk, tmp, offsetof(cp, n_out_rows),
                         offsetof(cp, src), offsetof(cp, dst), offsetof(cp, dst_row_stride),
                         params_.row_step},
                        params_.n_rows, block);
    add(rsp, frame_bytes);
    postamble();
    if (emulated) emit_int8_dot_constant_table(*this, constants);
    if (!avx512 && tail != 0) {
        align(32);
        L(mask_table);
        for (int l = 0; l < 8; ++l)
            dd(l < tail ? 0xffffffffu : 0u);
    }
}

template class jit_uni_spmm_width_kernel_t<cpu_isa::avx2>;
template class jit_uni_spmm_width_kernel_t<cpu_isa::avx512_core>;
template class jit_uni_spmm_width_kernel_t<cpu_isa::avx512_core_vnni>;

std::shared_ptr<const jit_spmm_width_kernel> spmm_width_kernel(const sparse_kernel_params &params) {
    static runtime::lru_cache<sparse_kernel_params, jit_spmm_width_kernel,
                              sparse_kernel_params_hash>
            cache("jit_code:spmm_width");
    return cache.get_or_create(params, [&] {
        return make_for_isa<jit_uni_spmm_width_kernel_t, jit_spmm_width_kernel>(params,
                                                                                "spmm_width");
    });
}

} // namespace qsp::jit
