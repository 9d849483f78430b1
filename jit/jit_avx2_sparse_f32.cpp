#include "jit/jit_avx2_sparse_f32.hpp"

#include "jit/jit_reduce16.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

namespace qsp::jit {

using namespace Xbyak;

namespace {

constexpr size_t kernel_code_bytes = 16 * 1024;

void check_n_vec(int n_vec) {
    if (n_vec < 1 || n_vec > tile_batch / avx2_lanes)
        throw std::invalid_argument("avx2 kernel: n_vec must be in [1, 8], got "
                                    + std::to_string(n_vec));
}

} // namespace

jit_avx2_spmm_f32_kernel::jit_avx2_spmm_f32_kernel(int n_vec)
    : jit_generator("avx2_spmm_f32_v" + std::to_string(n_vec), kernel_code_bytes), n_vec_(n_vec) {
    check_n_vec(n_vec);
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx2_spmm_f32_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 values = r8, offsets = r9, row_ptr = r10, row = r11, row_end = r12, src = r13,
                dst = r14, i = rax, end = rdx;
    const Reg64 off[4] = {rsi, rdi, rbx, rbp};
    const int nv = n_vec_;
    preamble();
    mov(values, ptr[param + offsetof(spmm_call_params, values)]);
    mov(offsets, ptr[param + offsetof(spmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(spmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(spmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(spmm_call_params, row_end)]);
    mov(src, ptr[param + offsetof(spmm_call_params, src_tile)]);
    mov(dst, ptr[param + offsetof(spmm_call_params, dst_tile)]);

    Label row_loop, quad_loop, single_loop, store, done;
    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    for (int v = 0; v < nv; ++v)
        vxorps(Ymm(v), Ymm(v), Ymm(v));
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(quad_loop);
    lea(rcx, ptr[i + 4]);
    cmp(rcx, end);
    jg(single_loop, T_NEAR);
    for (int u = 0; u < 4; ++u)
        movsxd(off[u], dword[offsets + i * 4 + u * 4]);
    for (int u = 0; u < 4; ++u) {
        vbroadcastss(Ymm(8 + u), dword[values + i * 4 + u * 4]);
        for (int v = 0; v < nv; ++v)
            vfmadd231ps(Ymm(v), Ymm(8 + u), yword[src + off[u] + v * 32]);
    }
    add(i, 4);
    jmp(quad_loop);

    L(single_loop);
    cmp(i, end);
    jge(store, T_NEAR);
    movsxd(off[0], dword[offsets + i * 4]);
    vbroadcastss(ymm8, dword[values + i * 4]);
    for (int v = 0; v < nv; ++v)
        vfmadd231ps(Ymm(v), ymm8, yword[src + off[0] + v * 32]);
    inc(i);
    jmp(single_loop);

    L(store);
    mov(rcx, row);
    shl(rcx, 8);
    for (int v = 0; v < nv; ++v)
        vmovups(yword[dst + rcx + v * 32], Ymm(v));
    inc(row);
    jmp(row_loop);

    L(done);
    postamble();
}

jit_avx2_sddmm_f32_kernel::jit_avx2_sddmm_f32_kernel(int n_vec)
    : jit_generator("avx2_sddmm_f32_v" + std::to_string(n_vec), kernel_code_bytes), n_vec_(n_vec) {
    check_n_vec(n_vec);
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx2_sddmm_f32_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 offsets = r9, row_ptr = r10, row = r11, row_end = r12, x = r13, dy = r14, dw = r15,
                i = rax, end = rdx, off = rsi, dy_row = rbp;
    const int nv = n_vec_;
    const Ymm tmp(8), tree_a(9), tree_b(10), lane_index(13), perm(14), mask(15);
    preamble();
    mov(offsets, ptr[param + offsetof(sddmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(sddmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(sddmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(sddmm_call_params, row_end)]);
    mov(x, ptr[param + offsetof(sddmm_call_params, x_tile)]);
    mov(dy, ptr[param + offsetof(sddmm_call_params, dy_tile)]);
    mov(dw, ptr[param + offsetof(sddmm_call_params, diff_values)]);
    Label tables, row_loop, group_loop, next_row, done;
    vmovups(perm, yword[rip + tables]);
    vmovups(lane_index, yword[rip + tables + 32]);

    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    mov(dy_row, row);
    shl(dy_row, 8);
    add(dy_row, dy);
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(group_loop);
    cmp(i, end);
    jge(next_row, T_NEAR);
    // mask = lanes j < min(8, end - i): the row's real nonzeros in this group
    mov(rcx, end);
    sub(rcx, i);
    vmovd(Xmm(mask.getIdx()), ecx); // only the low bits matter: compared below
    vpbroadcastd(mask, Xmm(mask.getIdx()));
    vpcmpgtd(mask, mask, lane_index);
    for (int j = 0; j < 8; ++j) {
        movsxd(off, dword[offsets + i * 4 + j * 4]);
        vmovups(tmp, yword[x + off]);
        vmulps(Ymm(j), tmp, yword[dy_row]);
        for (int v = 1; v < nv; ++v) {
            vmovups(tmp, yword[x + off + v * 32]);
            vfmadd231ps(Ymm(j), tmp, yword[dy_row + v * 32]);
        }
    }
    emit_reduce8(*this, reduce16_kind::f32, tree_a, tree_b);
    vpermps(ymm1, perm, ymm0);
    vmaskmovps(ymm2, mask, yword[dw + i * 4]);
    vaddps(ymm2, ymm2, ymm1);
    vmaskmovps(yword[dw + i * 4], mask, ymm2);
    add(i, 8);
    jmp(group_loop);

    L(next_row);
    inc(row);
    jmp(row_loop);

    L(done);
    postamble();

    align(32);
    L(tables);
    for (int32_t lane : reduce8_lane_of())
        dd(static_cast<uint32_t>(lane));
    for (int j = 0; j < 8; ++j)
        dd(static_cast<uint32_t>(j));
}

} // namespace qsp::jit
