#include "primitives/sparse_jit/jit_implementation.hpp"

#include <mutex>
#include <set>

namespace qsp::detail {

const std::vector<cpu_isa> &jit_tiers(quant_scheme scheme) {
    static const std::vector<cpu_isa> f32{cpu_isa::avx512_core, cpu_isa::avx2},
            s8{cpu_isa::avx512_core_vnni, cpu_isa::avx512_core, cpu_isa::avx2};
    return scheme == quant_scheme::s8 ? s8 : f32;
}

const char *jit_implementation_name(cpu_isa isa, const char *variant) {
    static std::mutex mutex;
    static std::set<std::string> names; // nodes never move: c_str() stays valid
    std::string name = std::string("jit:") + to_string(isa);
    if (variant && *variant) name += std::string(":") + variant;
    std::lock_guard<std::mutex> lock(mutex);
    return names.insert(std::move(name)).first->c_str();
}

std::string jit_tier_refusal(quant_scheme scheme, cpu_isa isa) {
    const cpu_isa effective = effective_cpu_isa();
    if (effective < isa)
        return std::string("needs ") + to_string(isa) + ", effective ISA is "
               + to_string(effective);
    for (cpu_isa tier : jit_tiers(scheme))
        if (tier <= effective) {
            if (tier == isa) return "";
            return std::string("superseded by the ") + to_string(tier) + " tier on this CPU";
        }
    return ""; // unreachable: isa itself is a tier <= effective
}

} // namespace qsp::detail
