#include "jit/jit_uni_spmm_kernel.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

#include "jit/jit_spmm_entry.hpp"
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
    check_s8_word(p, "spmm", false, true);
}

} // namespace

template <cpu_isa isa>
jit_uni_spmm_kernel_t<isa>::jit_uni_spmm_kernel_t(const sparse_kernel_params &params)
    : jit_spmm_kernel("spmm", params) {
    check_params(params);
    finish();
}

template <cpu_isa isa> void jit_uni_spmm_kernel_t<isa>::generate() {
    const spmm_entry_emitter<isa> em(*this, params_);

    // General registers; the group counter and row stride live in a small
    // stack frame.
    const Reg64 values = r8, offsets = r9, group_ptr = r10, row = r11, row_end = r12, src = r13,
                dst = r14, n_groups = r15, i = rax, end = rdx, tmp = rcx;
    const Reg64 off[4] = {rsi, rdi, rbx, rbp}; // rdi (the params) is saved in the frame
    const Address params = qword[rsp], group = qword[rsp + 8], dst_row_stride = qword[rsp + 16],
                  row_begin = qword[rsp + 24];
    auto field = [&](size_t offset) { return qword[tmp + offset]; }; // after mov(tmp, params)
    using cp = spmm_call_params;

    // Groups outside, rows inside: a group's source rows stay in L1 while
    // every row of the part uses them.
    Label constants, group_loop, row_loop, rows_done, first_group, sums_ready, done;
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
    em.load_constants(constants);
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
    em.zero_sums(1);
    cmp(group, 0);
    je(first_group, T_NEAR);
    mov(tmp, row);
    imul(tmp, dst_row_stride);
    em.load_sums(dst + tmp);
    jmp(sums_ready, T_NEAR);
    L(first_group);
    em.zero_sums(0);
    L(sums_ready);
    // entries [group_ptr[row * (n_groups + 1) + group], ... + 1)
    mov(i, row);
    imul(i, n_groups);
    add(i, row);
    add(i, group);
    mov(end, ptr[group_ptr + i * 8 + 8]);
    mov(i, ptr[group_ptr + i * 8]);

    em.entry_loop(i, i, end, offsets, values, src, {off[0], off[1], off[2], off[3]}, tmp);

    mov(tmp, row);
    imul(tmp, dst_row_stride);
    add(tmp, dst);
    em.store_sums(tmp);
    inc(row);
    jmp(row_loop, T_NEAR);

    L(rows_done);
    inc(group);
    jmp(group_loop, T_NEAR);

    L(done);
    add(rsp, 32);
    postamble();
    em.emit_constant_table(constants);
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
