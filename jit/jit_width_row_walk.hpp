// What the two output-width-innermost generators (SpMM and SDDMM,
// width_abi.hpp) share: the driver that walks the call's output rows in
// blocks of n_rows, then the rows left (fewer than n_rows) as one block of
// their own, moving the source and destination blocks on by their per-row
// steps after each block (what a block does is the kernel's own; the rows
// left had gone one at a time: a 7-row image took a block of 4 and three
// single rows, each pass over the entries as costly as a block's with a
// quarter of its work), and the address of a group's entry runs.
#pragma once

#include <cstddef>
#include <functional>

#include <xbyak/xbyak.h>

namespace qsp::jit {

struct width_row_walk {
    // Where the walk keeps its position (stack slots of the kernel's frame)
    // and a scratch register it may clobber.
    Xbyak::Address rows_left, src_blk, dst_blk;
    Xbyak::Reg64 tmp;
    // Offsets in the call parameters (read through `param`): the number of
    // output rows, the first source and destination blocks, and how far the
    // destination moves per output row; the source's step is the kernel's.
    size_t n_out_rows, src, dst, dst_row_step;
    int64_t src_row_step;
};

// Emits the walk; block(rows) emits one block of `rows` output rows
// (n_rows, or each count below it for the rows left).
inline void emit_width_row_walk(Xbyak::CodeGenerator &g, const Xbyak::Reg64 &param,
                                const width_row_walk &w, int n_rows,
                                const std::function<void(int)> &block) {
    using namespace Xbyak;
    auto field = [&](size_t offset) { return g.qword[param + offset]; };
    auto advance = [&](int rows) {
        g.sub(w.rows_left, rows);
        g.mov(w.tmp, w.src_row_step * rows);
        g.add(w.src_blk, w.tmp);
        g.mov(w.tmp, field(w.dst_row_step));
        if (rows > 1) g.imul(w.tmp, w.tmp, rows);
        g.add(w.dst_blk, w.tmp);
    };
    Label block_loop, single_loop, done;
    g.mov(w.tmp, field(w.n_out_rows));
    g.mov(w.rows_left, w.tmp);
    g.mov(w.tmp, field(w.src));
    g.mov(w.src_blk, w.tmp);
    g.mov(w.tmp, field(w.dst));
    g.mov(w.dst_blk, w.tmp);
    if (n_rows > 1) {
        g.L(block_loop);
        g.cmp(w.rows_left, n_rows);
        g.jl(single_loop, CodeGenerator::T_NEAR);
        block(n_rows);
        advance(n_rows);
        g.jmp(block_loop, CodeGenerator::T_NEAR);
        // the rows left, 0 to n_rows - 1 of them, as one block
        g.L(single_loop);
        for (int rows = n_rows - 1; rows >= 1; --rows) {
            Label other;
            g.cmp(w.rows_left, rows);
            g.jne(other, CodeGenerator::T_NEAR);
            block(rows);
            g.jmp(done, CodeGenerator::T_NEAR);
            g.L(other);
        }
        g.L(done);
        return;
    }
    g.L(single_loop);
    g.cmp(w.rows_left, 1);
    g.jl(done, CodeGenerator::T_NEAR);
    block(1);
    advance(1);
    g.jmp(single_loop, CodeGenerator::T_NEAR);
    g.L(done);
}

// Points runs_ptr at the first of the `runs` group pointers of (row,
// group): group_ptr + (row * (n_groups * runs + 1) + group * runs) * 8
// (width_abi.hpp: one run per group, or one per shift). Clobbers i, tmp.
inline void emit_group_runs(Xbyak::CodeGenerator &g, const Xbyak::Reg64 &runs_ptr,
                            const Xbyak::Reg64 &group_ptr, const Xbyak::Address &n_groups,
                            const Xbyak::Reg64 &row, const Xbyak::Address &group,
                            const Xbyak::Reg64 &i, const Xbyak::Reg64 &tmp, int runs) {
    g.mov(i, n_groups);
    if (runs > 1) g.imul(i, i, runs);
    g.inc(i);
    g.imul(i, row);
    g.mov(tmp, group);
    if (runs > 1) g.imul(tmp, tmp, runs);
    g.add(i, tmp);
    g.lea(runs_ptr, g.ptr[group_ptr + i * 8]);
}

} // namespace qsp::jit
