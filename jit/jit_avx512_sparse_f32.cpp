#include "jit/jit_avx512_sparse_f32.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

namespace qsp::jit {

using namespace Xbyak;

namespace {

void check_n_vec(int n_vec) {
    if (n_vec < 1 || n_vec > tile_batch / 16)
        throw std::invalid_argument("jit kernel: n_vec must be in [1, 4], got "
                                    + std::to_string(n_vec));
}

// Code of one kernel stays far below this; the bound only guards mistakes.
constexpr size_t kernel_code_bytes = 16 * 1024;

} // namespace

jit_avx512_spmm_f32_kernel::jit_avx512_spmm_f32_kernel(int n_vec)
    : jit_generator("avx512_spmm_f32_v" + std::to_string(n_vec), kernel_code_bytes), n_vec_(n_vec) {
    check_n_vec(n_vec);
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx512_spmm_f32_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 values = r8, offsets = r9, row_ptr = r10, row = r11, row_end = r12, src = r13,
                dst = r14, i = rax, end = rdx;
    const Reg64 off[4] = {rsi, rdi, rbx, rbp}; // rdi is free once the params are read
    const int nv = n_vec_;
    // Two accumulator sets alternate between consecutive nonzeros so that
    // FMA latency (4 cycles) does not serialise a row's updates.
    auto acc = [&](int set, int v) { return Zmm(set * 4 + v); };

    for (const Reg64 &r : {rbx, rbp, r12, r13, r14, r15})
        push(r);
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
    for (int s = 0; s < 2; ++s)
        for (int v = 0; v < nv; ++v)
            vxorps(acc(s, v), acc(s, v), acc(s, v));
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(quad_loop);
    lea(rcx, ptr[i + 4]);
    cmp(rcx, end);
    jg(single_loop, T_NEAR);
    for (int u = 0; u < 4; ++u)
        movsxd(off[u], dword[offsets + i * 4 + u * 4]);
    for (int u = 0; u < 4; ++u) {
        vbroadcastss(Zmm(8 + u), dword[values + i * 4 + u * 4]);
        for (int v = 0; v < nv; ++v)
            vfmadd231ps(acc(u % 2, v), Zmm(8 + u), zword[src + off[u] + v * 64]);
    }
    add(i, 4);
    jmp(quad_loop);

    L(single_loop);
    cmp(i, end);
    jge(store, T_NEAR);
    movsxd(off[0], dword[offsets + i * 4]);
    vbroadcastss(zmm8, dword[values + i * 4]);
    for (int v = 0; v < nv; ++v)
        vfmadd231ps(acc(0, v), zmm8, zword[src + off[0] + v * 64]);
    inc(i);
    jmp(single_loop);

    L(store);
    mov(rcx, row);
    shl(rcx, 8); // * tile_row_bytes
    for (int v = 0; v < nv; ++v) {
        vaddps(acc(0, v), acc(0, v), acc(1, v));
        vmovups(zword[dst + rcx + v * 64], acc(0, v));
    }
    inc(row);
    jmp(row_loop);

    L(done);
    vzeroupper();
    for (const Reg64 &r : {r15, r14, r13, r12, rbp, rbx})
        pop(r);
    ret();
}

namespace {

// Lane labels through the 16 -> 1 reduction tree, to find where each input
// vector's sum lands (the tree permutes them; one vpermps puts them back).
using lanes = std::array<int, 16>;

lanes lanes_shuff32x4(const lanes &a, const lanes &b, int imm) {
    lanes r{};
    for (int q = 0; q < 4; ++q) {
        const lanes &s = q < 2 ? a : b;
        const int from = (imm >> (2 * q)) & 3;
        for (int e = 0; e < 4; ++e)
            r[q * 4 + e] = s[from * 4 + e];
    }
    return r;
}

lanes lanes_shufps(const lanes &a, const lanes &b, int imm) {
    lanes r{};
    for (int q = 0; q < 4; ++q)
        for (int e = 0; e < 4; ++e) {
            const lanes &s = e < 2 ? a : b;
            r[q * 4 + e] = s[q * 4 + ((imm >> (2 * e)) & 3)];
        }
    return r;
}

lanes lanes_add(const lanes &x, const lanes &y) {
    if (x != y) throw std::logic_error("sddmm reduction tree mixes different nonzeros");
    return x;
}

struct tree_step {
    bool whole_quarters; // vshuff32x4 (true) or vshufps (false)
    int imm_a, imm_b;
};
// Each round halves the vectors: pairs of 128-bit quarters, then of 64-bit
// halves of a quarter, then of single lanes.
constexpr tree_step tree[4] = {
        {true, 0x44, 0xEE}, {true, 0x88, 0xDD}, {false, 0x44, 0xEE}, {false, 0x88, 0xDD}};

} // namespace

jit_avx512_sddmm_f32_kernel::jit_avx512_sddmm_f32_kernel(int n_vec)
    : jit_generator("avx512_sddmm_f32_v" + std::to_string(n_vec), kernel_code_bytes),
      n_vec_(n_vec) {
    check_n_vec(n_vec);
    std::array<lanes, 16> v{};
    for (int j = 0; j < 16; ++j)
        v[j].fill(j);
    int count = 16;
    for (const tree_step &s : tree) {
        for (int j = 0; j < count / 2; ++j) {
            const lanes &a = v[2 * j], &b = v[2 * j + 1];
            v[j] = s.whole_quarters
                           ? lanes_add(lanes_shuff32x4(a, b, s.imm_a),
                                       lanes_shuff32x4(a, b, s.imm_b))
                           : lanes_add(lanes_shufps(a, b, s.imm_a), lanes_shufps(a, b, s.imm_b));
        }
        count /= 2;
    }
    for (int lane = 0; lane < 16; ++lane)
        lane_of_[v[0][lane]] = lane;
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx512_sddmm_f32_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 offsets = r9, row_ptr = r10, row = r11, row_end = r12, x = r13, dy = r14, dw = r15,
                i = rax, end = rdx, off = rsi;
    const int nv = n_vec_;
    const Zmm perm(27), old(26), tmp_a(24), tmp_b(25);
    auto g = [](int v) { return Zmm(28 + v); };

    for (const Reg64 &r : {rbx, rbp, r12, r13, r14, r15})
        push(r);
    mov(offsets, ptr[param + offsetof(sddmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(sddmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(sddmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(sddmm_call_params, row_end)]);
    mov(x, ptr[param + offsetof(sddmm_call_params, x_tile)]);
    mov(dy, ptr[param + offsetof(sddmm_call_params, dy_tile)]);
    mov(dw, ptr[param + offsetof(sddmm_call_params, diff_values)]);
    Label perm_table, row_loop, group_loop, next_row, done;
    vmovups(perm, zword[rip + perm_table]);

    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    mov(rcx, row);
    shl(rcx, 8);
    for (int v = 0; v < nv; ++v)
        vmovups(g(v), zword[dy + rcx + v * 64]);
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(group_loop);
    cmp(i, end);
    jge(next_row, T_NEAR);
    // k1 = lanes of this group that are real nonzeros of the row; the rest
    // compute on whatever offsets follow (always readable: padded) and are
    // masked off at the store.
    mov(rcx, end);
    sub(rcx, i);
    mov(ebx, 16);
    cmp(rcx, rbx);
    cmovg(rcx, rbx);
    mov(ebx, 1);
    shl(ebx, cl);
    dec(ebx);
    kmovw(k1, ebx);
    for (int j = 0; j < 16; ++j) {
        movsxd(off, dword[offsets + i * 4 + j * 4]);
        vmulps(Zmm(j), g(0), zword[x + off]);
        for (int v = 1; v < nv; ++v)
            vfmadd231ps(Zmm(j), g(v), zword[x + off + v * 64]);
    }
    // 16 -> 1 reduction tree; round r reads `in` registers, writes `out`.
    int count = 16, in_base = 0, out_base = 16;
    for (const tree_step &s : tree) {
        for (int j = 0; j < count / 2; ++j) {
            const Zmm a(in_base + 2 * j), b(in_base + 2 * j + 1);
            if (s.whole_quarters) {
                vshuff32x4(tmp_a, a, b, s.imm_a);
                vshuff32x4(tmp_b, a, b, s.imm_b);
            } else {
                vshufps(tmp_a, a, b, s.imm_a);
                vshufps(tmp_b, a, b, s.imm_b);
            }
            vaddps(Zmm(out_base + j), tmp_a, tmp_b);
        }
        count /= 2;
        std::swap(in_base, out_base);
    }
    const Zmm sums(in_base), ordered(in_base + 1);
    vpermps(ordered, perm, sums);
    vmovups(old | k1 | T_z, zword[dw + i * 4]);
    vaddps(old, old, ordered);
    vmovups(zword[dw + i * 4] | k1, old);
    add(i, 16);
    jmp(group_loop);

    L(next_row);
    inc(row);
    jmp(row_loop);

    L(done);
    vzeroupper();
    for (const Reg64 &r : {r15, r14, r13, r12, rbp, rbx})
        pop(r);
    ret();

    align(64);
    L(perm_table);
    for (int j = 0; j < 16; ++j)
        dd(static_cast<uint32_t>(lane_of_[j]));
}

} // namespace qsp::jit
