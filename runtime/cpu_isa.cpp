#include "qsparseprop/runtime.hpp"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>

#include <omp.h>
#include <xbyak/xbyak_util.h>

namespace qsp {

namespace {

cpu_isa detect() {
    Xbyak::util::Cpu cpu;
    using C = Xbyak::util::Cpu;
    const bool avx512_core = cpu.has(C::tAVX512F) && cpu.has(C::tAVX512BW) && cpu.has(C::tAVX512VL)
                             && cpu.has(C::tAVX512DQ);
    if (avx512_core && cpu.has(C::tAVX512_VNNI)) return cpu_isa::avx512_core_vnni;
    if (avx512_core) return cpu_isa::avx512_core;
    if (cpu.has(C::tAVX2) && cpu.has(C::tFMA)) return cpu_isa::avx2;
    return cpu_isa::ref;
}

// The cap: the level in the low byte, bit 8 set where the AVX2 tier may
// use AVX-VNNI (a cap above avx2, or "avx2_vnni"). -1 = not read yet; the
// environment is read once, at first use, like oneDNN's ONEDNN_MAX_CPU_ISA.
constexpr int vnni_bit = 1 << 8;
std::atomic<int> max_isa_cap{-1};

int encoded(cpu_isa c, bool avx_vnni) {
    return static_cast<int>(c) | (avx_vnni ? vnni_bit : 0);
}

// A cap by name: cpu_isa_from_string's names, or avx2_vnni.
int cap_from_string(const std::string &name) {
    std::string n(name);
    std::transform(n.begin(), n.end(), n.begin(),
                   [](unsigned char ch) { return std::tolower(ch); });
    if (n == "avx2_vnni") return encoded(cpu_isa::avx2, true);
    cpu_isa c;
    try {
        c = cpu_isa_from_string(name);
    } catch (const std::invalid_argument &) {
        throw std::invalid_argument("QSP_MAX_CPU_ISA: unknown ISA '" + name
                                    + "'; accepted: ref, avx2 (no AVX-VNNI, as oneDNN's AVX2), "
                                      "avx2_vnni, avx512_core, avx512_vnni (or "
                                      "avx512_core_vnni), all");
    }
    return encoded(c, c > cpu_isa::avx2);
}

int cap_bits() {
    int c = max_isa_cap.load();
    if (c < 0) {
        const char *env = std::getenv("QSP_MAX_CPU_ISA");
        int from_env = encoded(cpu_isa::avx512_core_vnni, true);
        if (env && *env) from_env = cap_from_string(env);
        max_isa_cap.compare_exchange_strong(c, from_env);
        c = max_isa_cap.load();
    }
    return c;
}

cpu_isa cap() {
    return static_cast<cpu_isa>(cap_bits() & 0xff);
}

} // namespace

const char *to_string(cpu_isa isa) {
    switch (isa) {
        case cpu_isa::ref:
            return "ref";
        case cpu_isa::avx2:
            return "avx2";
        case cpu_isa::avx512_core:
            return "avx512_core";
        case cpu_isa::avx512_core_vnni:
            return "avx512_core_vnni";
    }
    return "unknown";
}

cpu_isa cpu_isa_from_string(const std::string &name) {
    std::string n(name);
    std::transform(n.begin(), n.end(), n.begin(),
                   [](unsigned char ch) { return std::tolower(ch); });
    if (n == "ref" || n == "none") return cpu_isa::ref;
    if (n == "avx2") return cpu_isa::avx2;
    if (n == "avx512_core" || n == "avx512") return cpu_isa::avx512_core;
    if (n == "avx512_vnni" || n == "avx512_core_vnni" || n == "all")
        return cpu_isa::avx512_core_vnni;
    throw std::invalid_argument(
            "QSP_MAX_CPU_ISA: unknown ISA '" + name
            + "'; accepted: ref, avx2, avx512_core, avx512_vnni (or avx512_core_vnni), all");
}

cpu_isa detected_cpu_isa() {
    static const cpu_isa isa = detect();
    return isa;
}

bool cpu_has_avx_vnni() {
    static const bool has = Xbyak::util::Cpu().has(Xbyak::util::Cpu::tAVX_VNNI);
    return has;
}

bool avx_vnni_usable() {
    return cpu_has_avx_vnni() && (cap_bits() & vnni_bit) != 0;
}

cpu_isa effective_cpu_isa() {
    return std::min(detected_cpu_isa(), cap());
}

void set_max_cpu_isa(cpu_isa c) {
    max_isa_cap.store(encoded(c, c > cpu_isa::avx2));
}

void set_max_cpu_isa(cpu_isa c, bool avx_vnni) {
    max_isa_cap.store(encoded(c, avx_vnni));
}

void set_max_cpu_isa(const std::string &name) {
    max_isa_cap.store(cap_from_string(name));
}

const char *version() {
    return QSP_VERSION_STRING;
}

int max_num_threads() {
    return std::max(256, 4 * omp_get_num_procs());
}

} // namespace qsp
