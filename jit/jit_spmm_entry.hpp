// The multiply-adds of one SpMM entry in the tile layout (tile_abi.hpp) and
// the register plan around them, shared by the generic SpMM kernel
// (jit_uni_spmm_kernel.hpp) and the code specialised to one layer's pattern
// (jit_uni_spmm_pattern_kernel.hpp): both emit the same arithmetic, so
// both give the same sums (f32: the same order of additions per row).
#pragma once

#include <array>
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
          // step; entry pairs take two items per step (their int16 sums
          // are widened together).
          unroll_(entry_pairs_       ? 2
                  : (!avx512 && s8_) ? 1
                                     : 4),
          sets_(avx512 && !entry_pairs_ ? 2 : 1) {}

    int unroll() const { return unroll_; }
    bool entry_pairs() const { return entry_pairs_; }
    int sets() const { return sets_; }
    bool needs_constants() const { return s8_ && !entry_pairs_ && !native_dot_; }

    // avx512: 0..7 accumulators, 8..11 f32 broadcasts, 12..19 s8 sources,
    //         20..23 s8 weights, 24..29 nibbles, constants, products.
    // avx2:   0..7 accumulators, 8..11 f32 broadcasts; s8 quads: 8 source,
    //         9 weights, 10..15 nibbles, constants, products; s8 entry
    //         pairs: 8 the first source, 9..12 two items' interleaved low /
    //         high halves, 13 / 14 weight magnitudes / signs, 15 int16 ones.
    // avx512 s8 entry pairs (avx512_core): 0..3 accumulators, 8..15 as on
    //         avx2, 16 zero, 17..20 the order's conversion, k2 the signs.
    // Entry pairs' accumulators hold, per 32 lanes h of a tile row, batch
    // elements {0-3, 16-19}, {4-7, 20-23}, {8-11, 24-27}, {12-15, 28-31}
    // (+ 32 h) in registers 4 h .. 4 h + 3 (zmm: all 64 lanes in 0..3,
    // register q holding elements 16 j + 4 q .. 16 j + 4 q + 3 in its 128-bit
    // lane j): the order the in-lane unpacks leave ("pair lane order");
    // load_sums / store_sums convert.
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

    // Entry pairs (avx2 s8, s8_word::entry_pair), one or two items at a
    // time: item k's two source-offset dwords at at[k], its weights dword
    // (|w1|, |w2|, w1, w2 as bytes, jit/tile_abi.hpp) at w[k], its two s8
    // source rows at src + those offsets (loaded into o1, o2 per 32 lanes).
    // Per 32 lanes an item's rows are interleaved byte-wise in each 128-bit
    // half (vpunpck[lh]bw), given its weights' signs (vpsignb) and
    // multiplied with their magnitudes (vpmaddubsw): w1 * x1[b] + w2 * x2[b]
    // in int16, exact (sources and weights are in [-127, 127], so at most
    // 2 * 127 * 127, and vpsignb never meets -128). The two items' int16
    // sums are interleaved and summed into int32 by one vpmaddwd with ones.
    // That is 2 in-lane shuffles per item per 16 lanes where widening the
    // bytes (vpmovsxbw, across lanes) took 4, on Zen 3 the kernel's bound.
    // AVX-512 has no vpsignb: there the interleaved bytes whose weight is
    // negative are negated under a mask (vpmovb2m of the signs; sources are
    // never -128), 64 lanes per step. The sums land in the pair lane order
    // (above).
    void entry_pair_items(const Xbyak::RegExp *at, const Xbyak::RegExp *w, int items,
                          const Xbyak::Reg64 &src, const Xbyak::Reg64 &o1,
                          const Xbyak::Reg64 &o2) const {
        auto &g = g_;
        const Vmm t(8), mag(13), sgn(14), ones(15), zeros(16);
        const Vmm lo[2] = {Vmm(9), Vmm(11)}, hi[2] = {Vmm(10), Vmm(12)};
        for (int h = 0; h < pair_halves(); ++h) {
            for (int k = 0; k < items; ++k) {
                g.movsxd(o1, g.dword[at[k]]);
                g.movsxd(o2, g.dword[at[k] + 4]);
                g.vpbroadcastw(mag, g.word[w[k]]);
                g.vpbroadcastw(sgn, g.word[w[k] + 2]);
                if (avx512)
                    g.vmovdqu8(t, g.ptr[src + o1]);
                else
                    g.vmovdqu(t, g.ptr[src + o1 + h * vlen]);
                g.vpunpckhbw(hi[k], t, g.ptr[src + o2 + h * vlen]);
                g.vpunpcklbw(lo[k], t, g.ptr[src + o2 + h * vlen]);
                if (avx512) {
                    g.vpmovb2m(Xbyak::Opmask(2), sgn);
                    g.vpsubb(lo[k] | Xbyak::Opmask(2), zeros, lo[k]);
                    g.vpsubb(hi[k] | Xbyak::Opmask(2), zeros, hi[k]);
                } else {
                    g.vpsignb(lo[k], lo[k], sgn);
                    g.vpsignb(hi[k], hi[k], sgn);
                }
                g.vpmaddubsw(lo[k], mag, lo[k]);
                g.vpmaddubsw(hi[k], mag, hi[k]);
            }
            if (items == 1) { // its sums beside zeros
                zero(lo[1]);
                zero(hi[1]);
            }
            const Vmm *halves[2] = {lo, hi};
            for (int q = 0; q < 4; ++q) { // lanes {0-3, 16-19}, {4-7, 20-23}, {8-11, ...}, ...
                const Vmm *from = halves[q / 2];
                if (q % 2 == 0)
                    g.vpunpcklwd(t, from[0], from[1]);
                else
                    g.vpunpckhwd(t, from[0], from[1]);
                g.vpmaddwd(t, t, ones);
                g.vpaddd(acc(0, 4 * h + q), acc(0, 4 * h + q), t);
            }
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
        // Entry pairs (entry_pair_plan) take two offsets per item, loaded
        // into off[0], off[1] where each item's 32 lanes need them.
        const int per_item = entry_pairs_ ? 2 : 1;
        if (off.size() < static_cast<size_t>(per_item))
            throw std::logic_error("spmm entry loop: too few offset registers");
        const int step = unroll_;
        // The first n items from i: their offsets loaded, their multiply-adds emitted.
        auto items = [&](int n) {
            auto at = [&](int u) { return offsets + i * (4 * per_item) + u * 4 * per_item; };
            auto w = [&](int u) { return values + v * 4 + u * 4; };
            if (entry_pairs_) {
                const Xbyak::RegExp ats[2] = {at(0), at(1)}, ws[2] = {w(0), w(1)};
                entry_pair_items(ats, ws, n, src, off[0], off[1]);
                return;
            }
            for (int u = 0; u < n; ++u) {
                const Xbyak::Reg64 &o = off[u % off.size()];
                g.movsxd(o, g.dword[at(u)]);
                entry(u, w(u), src, o);
            }
        };
        if (step > 1) {
            g.L(step_loop);
            g.lea(scratch, g.ptr[i + step]);
            g.cmp(scratch, end);
            g.jg(single_loop, Xbyak::CodeGenerator::T_NEAR);
            items(step);
            g.add(i, step);
            if (!same) g.add(v, step);
            g.jmp(step_loop, Xbyak::CodeGenerator::T_NEAR);
        }
        g.L(single_loop);
        g.cmp(i, end);
        g.jge(done, Xbyak::CodeGenerator::T_NEAR);
        items(1);
        g.inc(i);
        if (!same) g.inc(v);
        g.jmp(single_loop, Xbyak::CodeGenerator::T_NEAR);
        g.L(done);
    }

    // Accumulator sets [first_set, sets()) to zero.
    void zero_sums(int first_set) const {
        for (int s = first_set; s < sets_; ++s)
            for (int v = 0; v < sum_registers(); ++v)
                zero(acc(s, v));
    }
    // Set 0 from a destination row's stored partial sums.
    void load_sums(const Xbyak::RegExp &row) const {
        if (entry_pairs_ && avx512) {
            // batch order to the pair lane order: a 4 x 4 transpose of
            // 128-bit lanes (its own inverse); vectors past n_vec are zeros
            for (int j = 0; j < 4; ++j) {
                if (j < nv_)
                    g_.vmovdqu32(Vmm(8 + j), g_.ptr[row + j * vlen]);
                else
                    zero(Vmm(8 + j));
            }
            transpose_lanes({Vmm(8), Vmm(9), Vmm(10), Vmm(11)},
                            {acc(0, 0), acc(0, 1), acc(0, 2), acc(0, 3)});
            return;
        }
        if (entry_pairs_) {
            // batch order to the pair lane order; vectors past n_vec are zeros
            for (int h = 0; h < pair_halves(); ++h) {
                const Vmm n[4] = {Vmm(8), Vmm(9), Vmm(10), Vmm(11)};
                for (int j = 0; j < 4; ++j) {
                    if (4 * h + j < nv_)
                        g_.vmovdqu(n[j], g_.ptr[row + (4 * h + j) * vlen]);
                    else
                        zero(n[j]);
                }
                g_.vperm2i128(acc(0, 4 * h), n[0], n[2], 0x20);
                g_.vperm2i128(acc(0, 4 * h + 1), n[0], n[2], 0x31);
                g_.vperm2i128(acc(0, 4 * h + 2), n[1], n[3], 0x20);
                g_.vperm2i128(acc(0, 4 * h + 3), n[1], n[3], 0x31);
            }
            return;
        }
        for (int v = 0; v < nv_; ++v)
            g_.vmovups(acc(0, v), g_.ptr[row + v * vlen]);
    }
    // The sets added up and stored to a destination row.
    void store_sums(const Xbyak::RegExp &row) const {
        if (entry_pairs_ && avx512) { // the pair lane order back to the batch's
            transpose_lanes({acc(0, 0), acc(0, 1), acc(0, 2), acc(0, 3)},
                            {Vmm(8), Vmm(9), Vmm(10), Vmm(11)});
            for (int j = 0; j < nv_; ++j)
                g_.vmovdqu32(g_.ptr[row + j * vlen], Vmm(8 + j));
            return;
        }
        if (entry_pairs_) {
            // the pair lane order back to the batch's
            for (int h = 0; h < pair_halves(); ++h) {
                const Vmm n[4] = {Vmm(8), Vmm(9), Vmm(10), Vmm(11)};
                g_.vperm2i128(n[0], acc(0, 4 * h), acc(0, 4 * h + 1), 0x20);
                g_.vperm2i128(n[1], acc(0, 4 * h + 2), acc(0, 4 * h + 3), 0x20);
                g_.vperm2i128(n[2], acc(0, 4 * h), acc(0, 4 * h + 1), 0x31);
                g_.vperm2i128(n[3], acc(0, 4 * h + 2), acc(0, 4 * h + 3), 0x31);
                for (int j = 0; j < 4 && 4 * h + j < nv_; ++j)
                    g_.vmovdqu(g_.ptr[row + (4 * h + j) * vlen], n[j]);
            }
            return;
        }
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
        if (entry_pairs_ && avx512) { // int16 ones, and the zero the signs subtract from
            const Vmm ones(15);
            g_.vpternlogd(ones, ones, ones, 0xff);
            g_.vpsrlw(ones, ones, 15);
            g_.vpxord(Vmm(16), Vmm(16), Vmm(16));
        } else if (entry_pairs_) { // int16 ones for the entry pairs' widening vpmaddwd
            const Vmm ones(15);
            g_.vpcmpeqw(ones, ones, ones);
            g_.vpsrlw(ones, ones, 15);
        }
    }
    void emit_constant_table(Xbyak::Label &table) const {
        if (needs_constants()) emit_int8_dot_constant_table(g_, table);
    }

private:
    // out[q] = (in[0] lane q, in[1] lane q, in[2] lane q, in[3] lane q) over
    // the 128-bit lanes of four zmm (registers 17..20 in between; out may be
    // in).
    void transpose_lanes(const std::array<Vmm, 4> &in, const std::array<Vmm, 4> &out) const {
        const Vmm t[4] = {Vmm(17), Vmm(18), Vmm(19), Vmm(20)};
        g_.vshufi32x4(t[0], in[0], in[1], 0x44); // in0.0 in0.1 in1.0 in1.1
        g_.vshufi32x4(t[1], in[0], in[1], 0xee); // in0.2 in0.3 in1.2 in1.3
        g_.vshufi32x4(t[2], in[2], in[3], 0x44);
        g_.vshufi32x4(t[3], in[2], in[3], 0xee);
        g_.vshufi32x4(out[0], t[0], t[2], 0x88); // in0.0 in1.0 in2.0 in3.0
        g_.vshufi32x4(out[1], t[0], t[2], 0xdd);
        g_.vshufi32x4(out[2], t[1], t[3], 0x88);
        g_.vshufi32x4(out[3], t[1], t[3], 0xdd);
    }
    void zero(const Vmm &v) const {
        const Xbyak::Xmm x(v.getIdx()); // VEX: zeroes the upper bits too
        if (s8_)
            g_.vpxor(x, x, x);
        else
            g_.vxorps(x, x, x);
    }
    static Vmm bcast(int u) { return Vmm(8 + u); }
    // Entry pairs: 32 lanes of a tile row per step (zmm: all 64), four
    // accumulators each.
    int pair_halves() const { return avx512 ? 1 : (nv_ + 3) / 4; }
    int sum_registers() const { return entry_pairs_ ? 4 * pair_halves() : nv_; }
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
