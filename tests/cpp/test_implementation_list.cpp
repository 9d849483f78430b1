// The implementation list and its one ISA rule (jit_tier_refusal): at every
// ISA cap, exactly the best JIT tier of a scheme that the CPU runs accepts,
// and the others say why in one wording.
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "primitives/core/implementation.hpp"
#include "primitives/sparse_jit/jit_implementation.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::test {

namespace {

// Puts the cap back where it was (QSP_MAX_CPU_ISA may have set it).
struct isa_cap_guard {
    cpu_isa before = effective_cpu_isa();
    ~isa_cap_guard() { set_max_cpu_isa(before); }
};

TEST(ImplementationList, NamesAreUniquePerOperationAndScheme) {
    // The same name may serve f32 and s8 (both "jit:avx2"): a name and the
    // schemes it accepts identify one entry.
    const auto &list = detail::implementation_list();
    std::set<std::string> names;
    for (const auto &impl : list)
        names.insert(impl.name);
    EXPECT_GT(names.size(), 10u);
    EXPECT_TRUE(names.count("jit:avx2:pattern") && names.count("jit:avx512_core_vnni:width")
                && names.count("ref:any"));
    EXPECT_TRUE(list.back().is_reference) << "the reference is last";
}

TEST(ImplementationList, OneTierOfEachSchemeAcceptsAtEveryCap) {
    isa_cap_guard guard;
    for (cpu_isa cap :
         {cpu_isa::ref, cpu_isa::avx2, cpu_isa::avx512_core, cpu_isa::avx512_core_vnni}) {
        set_max_cpu_isa(cap);
        const cpu_isa eff = effective_cpu_isa();
        for (quant_scheme scheme : {quant_scheme::f32, quant_scheme::s8}) {
            std::vector<cpu_isa> accepting;
            for (cpu_isa tier : detail::jit_tiers(scheme)) {
                const std::string why = detail::jit_tier_refusal(scheme, tier);
                if (why.empty()) {
                    accepting.push_back(tier);
                } else if (tier > eff) {
                    EXPECT_EQ(why, std::string("needs ") + to_string(tier) + ", effective ISA is "
                                           + to_string(eff));
                } else {
                    EXPECT_EQ(why.rfind("superseded by the ", 0), 0u) << why;
                    EXPECT_NE(why.find(" tier on this CPU"), std::string::npos) << why;
                }
            }
            cpu_isa best = cpu_isa::ref;
            for (cpu_isa tier : detail::jit_tiers(scheme))
                if (tier <= eff && best == cpu_isa::ref) best = tier;
            if (best == cpu_isa::ref) {
                EXPECT_TRUE(accepting.empty()) << to_string(cap);
            } else {
                ASSERT_EQ(accepting.size(), 1u) << to_string(cap);
                EXPECT_EQ(accepting[0], best) << to_string(cap);
            }
        }
    }
}

TEST(ImplementationList, JitNamesAreStableStrings) {
    const char *a = detail::jit_implementation_name(cpu_isa::avx2, "width");
    const char *b = detail::jit_implementation_name(cpu_isa::avx2, "width");
    EXPECT_EQ(a, b) << "one string per name: keys may compare pointers' text";
    EXPECT_STREQ(a, "jit:avx2:width");
    EXPECT_STREQ(detail::jit_implementation_name(cpu_isa::avx512_core), "jit:avx512_core");
}

} // namespace

} // namespace qsp::test
