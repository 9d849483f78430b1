#include "primitives/plan_cache.hpp"

#include <sstream>

#include "qsparseprop/runtime.hpp"
#include "runtime/verbose.hpp"

namespace qsp::detail {

std::shared_ptr<const kernel>
cached_plan(const runtime::kernel_key &key,
            const std::function<std::shared_ptr<const kernel>()> &make) {
    static runtime::kernel_cache<kernel> cache;
    const double t0 = runtime::now_ms();
    bool generated = false;
    auto plan = cache.get_or_create(key, make, &generated);
    if (verbose_level() >= 1) {
        std::ostringstream line;
        line << "jit,plan," << key.str() << "," << (generated ? "generated" : "cache_hit") << ","
             << runtime::now_ms() - t0;
        runtime::verbose_print(line.str());
    }
    return plan;
}

} // namespace qsp::detail
