// The multiply-adds of one SpMM entry in the tile layout (tile_abi.hpp) and
// the register plan around them, shared by the generic SpMM kernel
// (jit_uni_spmm_kernel.hpp) and the code specialised to one layer's pattern
// (jit_uni_spmm_pattern_kernel.hpp): both emit the same arithmetic, so
// both give the same sums (f32: the same order of additions per row).
#pragma once

#include <stdexcept>
#include <type_traits>
#include <vector>

#include <xbyak/xbyak.h>

#include "jit/cpu_isa_traits.hpp"
#include "jit/jit_int8_dot.hpp"
#include "jit/jit_sparse_kernel.hpp"

namespace qsp::jit {

template <cpu_isa isa> class spmm_entry_emitter {
public:
    static constexpr bool avx512 = cpu_isa_traits<isa>::avx512;
    using Vmm = typename cpu_isa_traits<isa>::Vmm;
    static constexpr int vlen = cpu_isa_traits<isa>::vlen;

    spmm_entry_emitter(Xbyak::CodeGenerator &g, const sparse_kernel_params &p)
        : g_(g), nv_(p.n_vec), s8_(p.dtype == sparse_dtype::s8),
          entry_pairs_(s8_ && p.word == s8_word::entry_pair),
          native_dot_(native_dot(isa, p.dtype, p.avx_vnni)),
          // Entries per step, and accumulator sets alternating between
          // consecutive entries so that the multiply-add latency (4 cycles)
          // does not serialise a row. AVX2 has 16 registers: one set of up to
          // 8 accumulators already hides the latency, and the emulated s8
          // dot products need the rest, so that kernel takes one entry per
          // step; entry pairs take two general registers per item (two
          // offsets).
          unroll_(entry_pairs_       ? 2
                  : (!avx512 && s8_) ? 1
                                     : 4),
          sets_(avx512 ? 2 : 1) {}

    int unroll() const { return unroll_; }
    bool entry_pairs() const { return entry_pairs_; }
    int sets() const { return sets_; }
    bool needs_constants() const { return s8_ && !entry_pairs_ && !native_dot_; }

    // avx512: 0..7 accumulators, 8..11 f32 broadcasts, 12..19 s8 sources,
    //         20..23 s8 weights, 24..29 nibbles, constants, products.
    // avx2:   0..7 accumulators, 8..11 f32 broadcasts; s8 quads: 8 source,
    //         9 weights, 10..15 nibbles, constants, products; s8 entry
    //         pairs: 8, 9 weight pairs, 10 the first source, 11 / 12 the
    //         interleaved low / high halves.
    Vmm acc(int u, int v) const { return Vmm((u % sets_) * nv_ + v); }

    // Entry u of a step: its weight (f32, or the s8 quad dword) at w, its
    // source row at src + off; the sums go to accumulator set u % sets().
    void entry(int u, const Xbyak::RegExp &w, const Xbyak::Reg64 &src,
               const Xbyak::Reg64 &off) const {
        auto &g = g_;
        if (!s8_) {
            g.vbroadcastss(bcast(u), g.dword[w]);
            for (int v = 0; v < nv_; ++v)
                g.vfmadd231ps(acc(u, v), bcast(u), g.ptr[src + off + v * vlen]);
            return;
        }
        if (avx512 && native_dot_) {
            for (int v = 0; v < nv_; ++v) {
                g.vmovups(src_reg(u, v), g.ptr[src + off + v * vlen]);
                g.vpdpbusd(acc(u, v), src_reg(u, v), g.ptr_b[w]);
            }
            return;
        }
        g.vpbroadcastd(w_reg(u), g.dword[w]);
        for (int v = 0; v < nv_; ++v) {
            g.vmovups(src_reg(u, v), g.ptr[src + off + v * vlen]);
            if (native_dot_) {
                g.vpdpbusd(acc(u, v), src_reg(u, v), w_reg(u), Xbyak::VexEncoding);
            } else {
                emit_split_nibbles(g, src_reg(u, v), x_lo(), x_hi(), nibble_mask());
                emit_dot_u8s8_nibbles(g, acc(u, v), x_lo(), x_hi(), w_reg(u), ones16(), t_lo(),
                                      t_hi(), true);
            }
        }
    }

    // Entry pair u of a step (avx2 s8, s8_word::entry_pair): the two int16
    // weights at w, the two s8 source rows at src + o1 and src + o2. Per 16
    // lanes the rows' bytes are interleaved (x1[b], x2[b]) and widened to
    // int16: vpmaddwd with (w1, w2) gives w1 * x1[b] + w2 * x2[b] in lane b,
    // in batch order (the byte unpack keeps it, unlike a word unpack of ymm).
    void entry_pair(int u, const Xbyak::RegExp &w, const Xbyak::Reg64 &src, const Xbyak::Reg64 &o1,
                    const Xbyak::Reg64 &o2) const {
        auto &g = g_;
        const Xbyak::Xmm x(10), lo(11), hi(12);
        const Xbyak::Ymm wide_lo(11), wide_hi(12);
        g.vpbroadcastd(bcast(u), g.dword[w]);
        for (int c = 0; 2 * c < nv_; ++c) { // 16 lanes: accumulators 2c, 2c + 1
            g.vmovdqu(x, g.ptr[src + o1 + c * 16]);
            g.vpunpcklbw(lo, x, g.ptr[src + o2 + c * 16]);
            g.vpmovsxbw(wide_lo, lo);
            g.vpmaddwd(wide_lo, wide_lo, bcast(u));
            g.vpaddd(acc(u, 2 * c), acc(u, 2 * c), wide_lo);
            if (2 * c + 1 == nv_) break;
            g.vpunpckhbw(hi, x, g.ptr[src + o2 + c * 16]);
            g.vpmovsxbw(wide_hi, hi);
            g.vpmaddwd(wide_hi, wide_hi, bcast(u));
            g.vpaddd(acc(u, 2 * c + 1), acc(u, 2 * c + 1), wide_hi);
        }
    }

    // A row's entries [i, end) as a loop: steps of unroll() entries, then
    // one at a time. Entry i's source offset is at offsets[i], its weight at
    // values[v] (pass v = i when both follow one order); i and v advance.
    // off: registers for the source offsets, used in turn; scratch: a free
    // register (it may be off[0]: it is read before any offset is loaded).
    void entry_loop(const Xbyak::Reg64 &i, const Xbyak::Reg64 &v, const Xbyak::Reg64 &end,
                    const Xbyak::Reg64 &offsets, const Xbyak::Reg64 &values,
                    const Xbyak::Reg64 &src, const std::vector<Xbyak::Reg64> &off,
                    const Xbyak::Reg64 &scratch) const {
        auto &g = g_;
        const bool same = i.getIdx() == v.getIdx();
        Xbyak::Label step_loop, single_loop, done;
        // Entry pairs (entry_pair_plan) take two offsets per item, in
        // off[2u], off[2u + 1]; with two offset registers only, one item per step.
        const int per_item = entry_pairs_ ? 2 : 1;
        if (off.size() < static_cast<size_t>(per_item))
            throw std::logic_error("spmm entry loop: too few offset registers");
        const int step = !entry_pairs_                                    ? unroll_
                         : off.size() >= 2 * static_cast<size_t>(unroll_) ? unroll_
                                                                          : 1;
        // Item u of a step (from i): its offsets loaded, its multiply-adds emitted.
        auto item = [&](int u) {
            const Xbyak::RegExp at = offsets + i * (4 * per_item) + u * 4 * per_item;
            const Xbyak::RegExp w = values + v * 4 + u * 4;
            if (entry_pairs_) {
                g.movsxd(off[2 * u], g.dword[at]);
                g.movsxd(off[2 * u + 1], g.dword[at + 4]);
                entry_pair(u, w, src, off[2 * u], off[2 * u + 1]);
            } else {
                const Xbyak::Reg64 &o = off[u % off.size()];
                g.movsxd(o, g.dword[at]);
                entry(u, w, src, o);
            }
        };
        if (step > 1) {
            g.L(step_loop);
            g.lea(scratch, g.ptr[i + step]);
            g.cmp(scratch, end);
            g.jg(single_loop, Xbyak::CodeGenerator::T_NEAR);
            for (int u = 0; u < step; ++u)
                item(u);
            g.add(i, step);
            if (!same) g.add(v, step);
            g.jmp(step_loop, Xbyak::CodeGenerator::T_NEAR);
        }
        g.L(single_loop);
        g.cmp(i, end);
        g.jge(done, Xbyak::CodeGenerator::T_NEAR);
        item(0);
        g.inc(i);
        if (!same) g.inc(v);
        g.jmp(single_loop, Xbyak::CodeGenerator::T_NEAR);
        g.L(done);
    }

    // Accumulator sets [first_set, sets()) to zero.
    void zero_sums(int first_set) const {
        for (int s = first_set; s < sets_; ++s)
            for (int v = 0; v < nv_; ++v)
                zero(acc(s, v));
    }
    // Set 0 from a destination row's stored partial sums.
    void load_sums(const Xbyak::RegExp &row) const {
        for (int v = 0; v < nv_; ++v)
            g_.vmovups(acc(0, v), g_.ptr[row + v * vlen]);
    }
    // The sets added up and stored to a destination row.
    void store_sums(const Xbyak::RegExp &row) const {
        for (int v = 0; v < nv_; ++v) {
            if (sets_ > 1) {
                if (s8_)
                    g_.vpaddd(acc(0, v), acc(0, v), acc(1, v));
                else
                    g_.vaddps(acc(0, v), acc(0, v), acc(1, v));
            }
            g_.vmovups(g_.ptr[row + v * vlen], acc(0, v));
        }
    }

    // The emulated s8 dot products' constants: load them at entry, emit
    // their table after the code.
    void load_constants(const Xbyak::Label &table) const {
        if (needs_constants()) emit_int8_dot_constants(g_, ones16(), nibble_mask(), table);
    }
    void emit_constant_table(Xbyak::Label &table) const {
        if (needs_constants()) emit_int8_dot_constant_table(g_, table);
    }

private:
    void zero(const Vmm &v) const {
        const Xbyak::Xmm x(v.getIdx()); // VEX: zeroes the upper bits too
        if (s8_)
            g_.vpxor(x, x, x);
        else
            g_.vxorps(x, x, x);
    }
    static Vmm bcast(int u) { return Vmm(8 + u); }
    static Vmm src_reg(int u, int v) { return avx512 ? Vmm(12 + (u % 2) * 4 + v) : Vmm(8); }
    static Vmm w_reg(int u) { return avx512 ? Vmm(20 + u) : Vmm(9); }
    static Vmm x_lo() { return Vmm(avx512 ? 24 : 10); }
    static Vmm x_hi() { return Vmm(avx512 ? 25 : 11); }
    static Vmm ones16() { return Vmm(avx512 ? 26 : 14); }
    static Vmm nibble_mask() { return Vmm(avx512 ? 27 : 15); }
    static Vmm t_lo() { return Vmm(avx512 ? 28 : 12); }
    static Vmm t_hi() { return Vmm(avx512 ? 29 : 13); }

    Xbyak::CodeGenerator &g_;
    int nv_;
    bool s8_, entry_pairs_, native_dot_;
    int unroll_, sets_;
};

} // namespace qsp::jit
