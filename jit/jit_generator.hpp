// Base of every JIT kernel generator: owns the code memory and enforces
// write-xor-execute (code is generated into RW pages, then flipped to RX and
// never written again), dumps code for objdump under QSP_JIT_DUMP=1, and
// gives each kernel a name for verbose output and profilers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <xbyak/xbyak.h>

namespace qsp::jit {

class jit_generator : public Xbyak::CodeGenerator {
public:
    // max_code_size bounds the code of one kernel (the per-layer budget).
    jit_generator(std::string name, size_t max_code_size);
    ~jit_generator() override = default;
    jit_generator(const jit_generator &) = delete;
    jit_generator &operator=(const jit_generator &) = delete;

    const std::string &name() const { return name_; }
    const uint8_t *code() const { return getCode(); }
    size_t code_size() const { return getSize(); }
    // What the kernel holds: its code buffer (reserved at its maximum size)
    // and the generator (the caches' byte bound counts this).
    size_t memory_bytes() const { return maxSize_ + sizeof(*this); }

    // Runs generate(), seals the code (RX, not writable) and dumps it when
    // QSP_JIT_DUMP is set. Call once; returns the entry point.
    const void *create_kernel();
    template <typename fn_t> fn_t entry() const {
        return reinterpret_cast<fn_t>(const_cast<uint8_t *>(getCode()));
    }

protected:
    virtual void generate() = 0;
    // System V entry / exit of every kernel: save the callee-saved GPRs the
    // kernels use (rbx, rbp, r12-r15); on exit clear the upper vector state
    // (no AVX-SSE transition penalty in the caller), restore and return.
    void preamble();
    void postamble();

private:
    void dump() const;
    // QSP_PERF_MAP=1: a line in /tmp/perf-<pid>.map naming the kernel for perf.
    void add_to_perf_map() const;
    std::string name_;
    bool sealed_ = false;
};

} // namespace qsp::jit
