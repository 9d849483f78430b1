#include "primitives/sparse_jit/plan_cache.hpp"

#include <cstring>
#include <sstream>

#include "runtime/lru_cache.hpp"
#include "runtime/verbose.hpp"

namespace qsp::detail {

namespace {

struct plan_key {
    const char *impl; // a string literal of the implementation list
    cpu_isa isa;
    bool avx_vnni; // the AVX2 tier's plans differ with it (pairs or quads, its dot product)
    problem prob;  // batch 0
    bool operator==(const plan_key &o) const {
        return isa == o.isa && avx_vnni == o.avx_vnni && std::strcmp(impl, o.impl) == 0
               && prob == o.prob;
    }
};
struct plan_key_hash {
    size_t operator()(const plan_key &k) const {
        return problem_hash()(k.prob, static_cast<uint64_t>(k.isa) * 2 + k.avx_vnni);
    }
};

} // namespace

std::shared_ptr<const kernel>
cached_plan(const char *impl, cpu_isa isa, const problem &p,
            const std::function<std::shared_ptr<const kernel>()> &make) {
    static runtime::lru_cache<plan_key, kernel, plan_key_hash> cache("jit_plan");
    const double t0 = runtime::now_ms();
    bool generated = false;
    const bool avx_vnni = isa == cpu_isa::avx2 && avx_vnni_usable();
    auto plan =
            cache.get_or_create(plan_key{impl, isa, avx_vnni, p.without_batch()}, make, &generated);
    if (verbose_level() >= 1) {
        std::ostringstream line;
        line << "jit,plan," << impl << "," << to_string(direction(p.dir)) << ","
             << p.without_batch().shape_str() << ",threads=" << p.num_threads << ","
             << (generated ? "generated" : "cache_hit") << "," << runtime::now_ms() - t0;
        const std::string specialised = plan->specialisation();
        if (generated && !specialised.empty()) line << ",specialised:" << specialised;
        runtime::verbose_print(line.str());
    }
    return plan;
}

} // namespace qsp::detail
