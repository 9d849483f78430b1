#include "jit/jit_uni_spmm_pattern_kernel.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "jit/jit_spmm_entry.hpp"

namespace qsp::jit {

using namespace Xbyak;

namespace {

// Upper bounds of the bytes of code, for the buffer and the budget: an
// entry is an offset load, a weight load and per vector one or two
// instructions of at most 11 bytes (the emulated s8 dot product: ~12).
size_t entry_code_bytes(const sparse_kernel_params &p) {
    const bool s8 = p.dtype == sparse_dtype::s8;
    const bool native = p.isa == cpu_isa::avx512_core_vnni || p.avx_vnni;
    // entry pairs, per item and 32 lanes (zmm: 64): two offset loads, two
    // weight broadcasts, 7 vector instructions (zmm: 8) and half of the 12
    // that widen two items' sums (each at most 10 bytes; EVEX 11)
    if (p.word == s8_word::entry_pair)
        return p.isa >= cpu_isa::avx512_core ? 176
                                             : 16 + static_cast<size_t>((p.n_vec + 3) / 4) * 128;
    return 24 + static_cast<size_t>(p.n_vec) * (!s8 ? 12 : native ? 24 : 96);
}
size_t body_code_bytes(const sparse_kernel_params &p) {
    return 64 + static_cast<size_t>(p.n_vec) * 40; // sums in and out, the row loop
}
constexpr size_t fixed_code_bytes = 4096; // driver, looped body, tables

void check_params(const sparse_kernel_params &p, const spmm_pattern_shape &shape) {
    const int max_vec = tile_batch / vector_lanes(p.isa);
    if (p.isa == cpu_isa::ref)
        throw std::invalid_argument("jit spmm pattern: the reference tier has no generated code");
    if (p.n_vec < 1 || p.n_vec > max_vec)
        throw std::invalid_argument("jit spmm pattern: n_vec must be in [1, "
                                    + std::to_string(max_vec) + "], got "
                                    + std::to_string(p.n_vec));
    if (p.avx_vnni && (p.isa != cpu_isa::avx2 || p.dtype != sparse_dtype::s8))
        throw std::invalid_argument(
                "jit spmm pattern: avx_vnni applies to the avx2 s8 kernel only");
    check_s8_word(p, "spmm pattern", false, true);
    for (size_t k = 0; k < shape.lengths.size(); ++k)
        if (shape.lengths[k] < 1 || (k > 0 && shape.lengths[k] <= shape.lengths[k - 1]))
            throw std::invalid_argument(
                    "jit spmm pattern: lengths must be distinct, ascending and >= 1");
}

size_t code_bytes(const sparse_kernel_params &p, const std::vector<int64_t> &exact) {
    size_t bytes = fixed_code_bytes;
    for (int64_t l : exact)
        bytes += body_code_bytes(p) + static_cast<size_t>(l) * entry_code_bytes(p);
    return bytes + (exact.empty() ? 0 : 8 * static_cast<size_t>(exact.back() + 2)); // table
}

} // namespace

std::vector<int64_t> exact_body_lengths(const sparse_kernel_params &params,
                                        const spmm_pattern_shape &shape) {
    std::vector<int64_t> exact;
    for (int64_t l : shape.lengths) {
        exact.push_back(l);
        if (code_bytes(params, exact) > shape.code_budget) {
            exact.pop_back();
            break;
        }
    }
    return exact;
}

template <cpu_isa isa>
jit_uni_spmm_pattern_kernel_t<isa>::jit_uni_spmm_pattern_kernel_t(
        const sparse_kernel_params &params, const spmm_pattern_shape &shape)
    : jit_spmm_pattern_kernel(
            "spmm_pattern", params,
            (check_params(params, shape), code_bytes(params, exact_body_lengths(params, shape)))),
      exact_(exact_body_lengths(params, shape)) {
    finish();
}

template <cpu_isa isa> void jit_uni_spmm_pattern_kernel_t<isa>::generate() {
    const spmm_entry_emitter<isa> em(*this, params_);
    const int unroll = em.unroll();
    const int64_t max_exact = exact_.empty() ? 0 : exact_.back();
    constexpr int record = spmm_schedule_record_ints * 4;       // bytes per scheduled row
    constexpr int ahead = spmm_schedule_prefetch_rows * record; // the row prefetched for

    // e: the row's first slot (offsets), v: its first value; the first-group
    // flag lives in the frame (read once per row, a predicted branch).
    const Reg64 values = r8, offsets = r9, sched = r10, bucket = r11, bucket_end = r12, src = r13,
                dst = r14, v = r15, len = rax, count = rcx, tmp = rdx, e = rsi, dst_off = rdi;
    const Reg64 off[2] = {rbx, rbp};
    using cp = spmm_schedule_call_params;

    Label constants, table, bucket_loop, has_body, done, looped;
    std::vector<Label> body(exact_.size());

    // The driver: per bucket, its length picks the body (a call through the
    // table: one indirect branch per bucket instead of a loop exit per row).
    preamble();
    sub(rsp, 8);
    mov(tmp, rdi);
    mov(values, qword[tmp + offsetof(cp, values)]);
    mov(offsets, qword[tmp + offsetof(cp, src_offsets)]);
    mov(sched, qword[tmp + offsetof(cp, rows)]);
    mov(bucket, qword[tmp + offsetof(cp, buckets)]);
    mov(bucket_end, qword[tmp + offsetof(cp, n_buckets)]);
    lea(bucket_end, ptr[bucket + bucket_end * 8]);
    mov(src, qword[tmp + offsetof(cp, src_tile)]);
    mov(dst, qword[tmp + offsetof(cp, dst_tile)]);
    mov(e, qword[tmp + offsetof(cp, first_group)]);
    mov(qword[rsp], e);
    em.load_constants(constants);

    L(bucket_loop);
    cmp(bucket, bucket_end);
    jae(done, T_NEAR);
    movsxd(len, dword[bucket]);
    mov(ecx, dword[bucket + 4]); // count; zero-extends
    add(bucket, 8);
    mov(tmp, len);
    cmp(tmp, max_exact);
    jbe(has_body, T_NEAR);
    mov(tmp, max_exact + 1);
    L(has_body);
    lea(dst_off, ptr[rip + table]);
    call(qword[dst_off + tmp * 8]);
    jmp(bucket_loop, T_NEAR);
    L(done);
    add(rsp, 8);
    postamble();

    // One scheduled row (inside a body: the call's return address sits on
    // the flag). Its sums start at zero (first group) or from dst.
    const Address first_group = qword[rsp + 8];
    auto row_begin = [&](int value_lines) {
        // Values stay in the layer's order (the caller's weights, not a
        // copy): a row's values are contiguous, but the next row's are
        // elsewhere, so fetch those of a row a few ahead.
        movsxd(tmp, dword[sched + ahead + 4]);
        for (int l = 0; l < value_lines; ++l)
            prefetcht0(ptr[values + tmp * 4 + l * 64]);
        movsxd(e, dword[sched]);
        movsxd(v, dword[sched + 4]);
        movsxd(dst_off, dword[sched + 8]);
        Label load, ready;
        em.zero_sums(1);
        cmp(first_group, 0);
        je(load, T_NEAR);
        em.zero_sums(0);
        // The first group writes rows in schedule order, not memory order:
        // the hardware prefetchers cannot see the next row coming, so ask
        // for it a few rows ahead (owned: it will be written; AVX2-era CPUs
        // without PREFETCHW get a read prefetch). Later groups find the rows
        // in cache where the first left them.
        movsxd(tmp, dword[sched + ahead + 8]);
        for (int b = 0; b < params_.n_vec * em.vlen; b += 64) {
            if (em.avx512)
                prefetchw(ptr[dst + tmp + b]);
            else
                prefetcht0(ptr[dst + tmp + b]);
        }
        jmp(ready, T_NEAR);
        L(load);
        em.load_sums(dst + dst_off);
        L(ready);
    };
    auto row_end = [&](const Label &row_loop) {
        em.store_sums(dst + dst_off);
        add(sched, record);
        dec(count);
        jnz(row_loop, T_NEAR);
        ret();
    };
    // lines a row of `length` values may touch (it need not start on one)
    auto lines_of = [](int64_t length) {
        return static_cast<int>(std::min<int64_t>(4, (length * 4 + 63) / 64 + 1));
    };

    // Exact bodies: entries alternate accumulator sets in steps of
    // `unroll`, the remainder goes to set 0, as in the generic kernel.
    for (size_t b = 0; b < exact_.size(); ++b) {
        const int64_t length = exact_[b];
        const int64_t stepped = length / unroll * unroll;
        Label row_loop;
        L(body[b]);
        L(row_loop);
        row_begin(lines_of(length));
        for (int64_t u = 0; u < length; ++u) {
            const int disp = static_cast<int>(u * 4);
            if (em.entry_pairs()) { // two items at a time, two offsets each
                const int items = u + 1 < length ? 2 : 1;
                const RegExp at[2] = {offsets + e * 8 + 2 * disp, offsets + e * 8 + 2 * disp + 8},
                             w[2] = {values + v * 4 + disp, values + v * 4 + disp + 4};
                em.entry_pair_items(at, w, items, src, off[0], off[1]);
                u += items - 1;
                continue;
            }
            const Reg64 &o = off[u % 2];
            movsxd(o, dword[offsets + e * 4 + disp]);
            em.entry(u < stepped ? static_cast<int>(u % unroll) : 0, values + v * 4 + disp, src, o);
        }
        row_end(row_loop);
    }

    // Longer segments (and length 0 when no body has it): the generic
    // loop, the length in `len`.
    {
        Label row_loop;
        L(looped);
        L(row_loop);
        row_begin(lines_of(max_exact + 1));
        lea(tmp, ptr[e + len]); // end
        em.entry_loop(e, v, tmp, offsets, values, src, {off[0], off[1]}, off[0]);
        row_end(row_loop);
    }

    // Table: entry l is the body of length l, or the looped one.
    align(8);
    L(table);
    size_t next = 0;
    for (int64_t l = 0; l <= max_exact + 1; ++l) {
        if (next < exact_.size() && exact_[next] == l)
            putL(body[next++]);
        else
            putL(looped);
    }
    em.emit_constant_table(constants);
}

template class jit_uni_spmm_pattern_kernel_t<cpu_isa::avx2>;
template class jit_uni_spmm_pattern_kernel_t<cpu_isa::avx512_core>;
template class jit_uni_spmm_pattern_kernel_t<cpu_isa::avx512_core_vnni>;

std::shared_ptr<const jit_spmm_pattern_kernel>
spmm_pattern_kernel(const sparse_kernel_params &params, const spmm_pattern_shape &shape) {
    switch (params.isa) {
        case cpu_isa::avx2:
            return std::make_shared<const jit_uni_spmm_pattern_kernel_t<cpu_isa::avx2>>(params,
                                                                                        shape);
        case cpu_isa::avx512_core:
            return std::make_shared<const jit_uni_spmm_pattern_kernel_t<cpu_isa::avx512_core>>(
                    params, shape);
        case cpu_isa::avx512_core_vnni:
            return std::make_shared<const jit_uni_spmm_pattern_kernel_t<cpu_isa::avx512_core_vnni>>(
                    params, shape);
        case cpu_isa::ref:
            break;
    }
    throw std::invalid_argument("jit spmm pattern: the reference tier has no generated code");
}

} // namespace qsp::jit
