// Prints what qsparseprop sees on this machine: version, detected and
// effective ISA (after QSP_MAX_CPU_ISA), the oneDNN it runs on, and the
// bounds of its caches and scratch pool.
#include <cstdio>

#include <oneapi/dnnl/dnnl.hpp>

#include "qsparseprop/qsparseprop.hpp"

int main() {
    const dnnl_version_t *v = dnnl_version();
    std::printf("qsparseprop %s\n", qsp::version());
    std::printf("cpu isa: detected %s, effective %s, avx_vnni %s (the avx2 tier %s it)\n",
                qsp::to_string(qsp::detected_cpu_isa()), qsp::to_string(qsp::effective_cpu_isa()),
                qsp::cpu_has_avx_vnni() ? "yes" : "no",
                qsp::avx_vnni_usable() ? "uses" : "does not use");
    std::printf("oneDNN %d.%d.%d (%s)\n", v->major, v->minor, v->patch, v->hash);
    std::printf("cache capacity: %zu entries each (QSP_CACHE_CAPACITY)\n", qsp::cache_capacity());
    std::printf("scratch pool: keeps up to %zu MiB idle (QSP_SCRATCH_CAPACITY_MB)\n",
                qsp::scratch_pool_info().capacity_bytes >> 20);
    return 0;
}
