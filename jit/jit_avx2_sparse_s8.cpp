#include "jit/jit_avx2_sparse_s8.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

#include "jit/jit_avx2_sparse_f32.hpp"
#include "jit/jit_int8_dot.hpp"
#include "jit/jit_reduce16.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {
constexpr size_t kernel_code_bytes = 32 * 1024;
} // namespace

jit_avx2_spmm_s8_kernel::jit_avx2_spmm_s8_kernel(int n_vec, bool avx_vnni)
    : jit_generator(std::string(avx_vnni ? "avx_vnni_spmm_s8q_v" : "avx2_spmm_s8q_v")
                            + std::to_string(n_vec),
                    kernel_code_bytes),
      n_vec_(n_vec), avx_vnni_(avx_vnni) {
    if (n_vec < 1 || n_vec > tile_batch / avx2_lanes)
        throw std::invalid_argument("avx2 s8 spmm: n_vec must be in [1, 8], got "
                                    + std::to_string(n_vec));
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx2_spmm_s8_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 values = r8, offsets = r9, row_ptr = r10, row = r11, row_end = r12, src = r13,
                dst = r14, i = rax, end = rdx, off = rsi;
    const int nv = n_vec_;
    // ymm0..7 accumulators; 8 the source vector, 9 the quad's weights,
    // 10..13 nibbles and products, 14 ones16, 15 the nibble mask.
    const Ymm x(8), w(9), x_lo(10), x_hi(11), t_lo(12), t_hi(13), ones16(14), nibble_mask(15);
    preamble();
    mov(values, ptr[param + offsetof(spmm_call_params, values)]);
    mov(offsets, ptr[param + offsetof(spmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(spmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(spmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(spmm_call_params, row_end)]);
    mov(src, ptr[param + offsetof(spmm_call_params, src_tile)]);
    mov(dst, ptr[param + offsetof(spmm_call_params, dst_tile)]);
    if (!avx_vnni_) emit_int8_dot_constants(*this, ones16, nibble_mask);

    Label row_loop, entry_loop, store, done;
    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    for (int v = 0; v < nv; ++v)
        vpxor(Ymm(v), Ymm(v), Ymm(v));
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);
    L(entry_loop);
    cmp(i, end);
    jge(store, T_NEAR);
    movsxd(off, dword[offsets + i * 4]);
    vpbroadcastd(w, dword[values + i * 4]);
    for (int v = 0; v < nv; ++v) {
        vmovdqu(x, yword[src + off + v * 32]);
        if (avx_vnni_) {
            vpdpbusd(Ymm(v), x, w, VexEncoding);
            continue;
        }
        emit_split_nibbles(*this, x, x_lo, x_hi, nibble_mask);
        emit_dot_u8s8_nibbles(*this, Ymm(v), x_lo, x_hi, w, ones16, t_lo, t_hi, true);
    }
    inc(i);
    jmp(entry_loop);

    L(store);
    mov(rcx, row);
    shl(rcx, 8);
    for (int v = 0; v < nv; ++v)
        vmovdqu(yword[dst + rcx + v * 32], Ymm(v));
    inc(row);
    jmp(row_loop);

    L(done);
    postamble();
}

jit_avx2_sddmm_s8_kernel::jit_avx2_sddmm_s8_kernel(bool avx_vnni)
    : jit_generator(avx_vnni ? "avx_vnni_sddmm_s8" : "avx2_sddmm_s8", kernel_code_bytes),
      avx_vnni_(avx_vnni) {
    fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel()));
}

void jit_avx2_sddmm_s8_kernel::generate() {
    const Reg64 param = rdi;
    const Reg64 offsets = r9, row_ptr = r10, row = r11, row_end = r12, x = r13, dy = r14, dw = r15,
                i = rax, end = rdx, off = rsi;
    // ymm0..7 accumulators of 8 nonzeros; 8..11 the row's G + 128 split
    // into nibbles (two ymm per 64-byte row); 12 ones16; 13/14 products and
    // tree temporaries; 15 the nibble mask, then the permutation, then the
    // store mask.
    const Ymm ones16(12), t_lo(13), t_hi(14), scratch(15);
    auto g_lo = [](int v) { return Ymm(8 + v); };
    auto g_hi = [](int v) { return Ymm(10 + v); };
    preamble();
    mov(offsets, ptr[param + offsetof(sddmm_call_params, src_offsets)]);
    mov(row_ptr, ptr[param + offsetof(sddmm_call_params, row_ptr)]);
    mov(row, ptr[param + offsetof(sddmm_call_params, row_begin)]);
    mov(row_end, ptr[param + offsetof(sddmm_call_params, row_end)]);
    mov(x, ptr[param + offsetof(sddmm_call_params, x_tile)]);
    mov(dy, ptr[param + offsetof(sddmm_call_params, dy_tile)]);
    mov(dw, ptr[param + offsetof(sddmm_call_params, diff_values)]);
    Label tables, row_loop, group_loop, next_row, done;

    L(row_loop);
    cmp(row, row_end);
    jge(done, T_NEAR);
    mov(rcx, row);
    shl(rcx, 6);     // * 64 bytes
    if (avx_vnni_) { // G + 128 stays whole: g_lo(v) holds it
        for (int v = 0; v < 2; ++v)
            vmovdqu(g_lo(v), yword[dy + rcx + v * 32]);
    } else {
        emit_int8_dot_constants(*this, ones16, scratch); // scratch = nibble mask for the split
        for (int v = 0; v < 2; ++v) {
            vmovdqu(t_lo, yword[dy + rcx + v * 32]);
            emit_split_nibbles(*this, t_lo, g_lo(v), g_hi(v), scratch);
        }
    }
    mov(i, ptr[row_ptr + row * 8]);
    mov(end, ptr[row_ptr + row * 8 + 8]);

    L(group_loop);
    cmp(i, end);
    jge(next_row, T_NEAR);
    for (int j = 0; j < 8; ++j) {
        movsxd(off, dword[offsets + i * 4 + j * 4]);
        if (avx_vnni_) vpxor(Ymm(j), Ymm(j), Ymm(j));
        for (int v = 0; v < 2; ++v) {
            if (avx_vnni_)
                vpdpbusd(Ymm(j), g_lo(v), yword[x + off + v * 32], VexEncoding);
            else
                emit_dot_u8s8_nibbles(*this, Ymm(j), g_lo(v), g_hi(v), yword[x + off + v * 32],
                                      ones16, t_lo, t_hi, v > 0);
        }
    }
    emit_reduce8(*this, reduce16_kind::s32, t_lo, t_hi);
    vmovdqu(scratch, yword[rip + tables]);
    vpermd(ymm1, scratch, ymm0);
    // store mask: lanes j < min(8, end - i)
    mov(rcx, end);
    sub(rcx, i);
    vmovd(Xmm(scratch.getIdx()), ecx);
    vpbroadcastd(scratch, Xmm(scratch.getIdx()));
    vpcmpgtd(scratch, scratch, yword[rip + tables + 32]);
    vpmaskmovd(ymm2, scratch, yword[dw + i * 4]);
    vpaddd(ymm2, ymm2, ymm1);
    vpmaskmovd(yword[dw + i * 4], scratch, ymm2);
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
