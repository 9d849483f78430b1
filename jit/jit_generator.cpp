#include "jit/jit_generator.hpp"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include <unistd.h>

namespace qsp::jit {

jit_generator::jit_generator(std::string name, size_t max_code_size)
    // DontSetProtectRWE: Xbyak would otherwise map the buffer RWX.
    : Xbyak::CodeGenerator(max_code_size, Xbyak::DontSetProtectRWE), name_(std::move(name)) {}

const void *jit_generator::create_kernel() {
    if (sealed_) throw std::logic_error("jit_generator::create_kernel called twice for " + name_);
    generate();
    ready(); // resolves labels while still writable
    setProtectModeRE();
    sealed_ = true;
    dump();
    add_to_perf_map();
    return getCode();
}

namespace {
const Xbyak::Reg64 callee_saved[] = {Xbyak::util::rbx, Xbyak::util::rbp, Xbyak::util::r12,
                                     Xbyak::util::r13, Xbyak::util::r14, Xbyak::util::r15};
} // namespace

void jit_generator::preamble() {
    for (const Xbyak::Reg64 &r : callee_saved)
        push(r);
}

void jit_generator::postamble() {
    vzeroupper();
    for (int k = 5; k >= 0; --k)
        pop(callee_saved[k]);
    ret();
}

void jit_generator::dump() const {
    const char *env = std::getenv("QSP_JIT_DUMP");
    if (!env || !*env || *env == '0') return;
    static std::atomic<int> counter{0};
    const char *dir = std::getenv("QSP_JIT_DUMP_DIR");
    const std::string path = std::string(dir && *dir ? dir : ".") + "/qsp_jit_" + name_ + "."
                             + std::to_string(counter++) + ".bin";
    if (FILE *f = std::fopen(path.c_str(), "wb")) {
        std::fwrite(getCode(), 1, getSize(), f);
        std::fclose(f);
    }
}

void jit_generator::add_to_perf_map() const {
    // /tmp/perf-<pid>.map is where `perf report` looks up symbols of code it
    // cannot find in a file: one "START SIZE name" line per kernel.
    static const bool on = [] {
        const char *env = std::getenv("QSP_PERF_MAP");
        return env && *env && *env != '0';
    }();
    if (!on) return;
    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);
    const std::string path = "/tmp/perf-" + std::to_string(::getpid()) + ".map";
    if (FILE *f = std::fopen(path.c_str(), "a")) {
        std::fprintf(f, "%llx %zx qsp_jit_%s\n",
                     static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(getCode())),
                     getSize(), name_.c_str());
        std::fclose(f);
    }
}

} // namespace qsp::jit
