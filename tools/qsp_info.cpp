// Prints what qsparseprop sees on this machine: version, detected and
// effective ISA (after QSP_MAX_CPU_ISA), and the oneDNN it runs on.
#include <cstdio>

#include <oneapi/dnnl/dnnl.hpp>

#include "qsparseprop/qsparseprop.hpp"

int main() {
    const dnnl_version_t *v = dnnl_version();
    std::printf("qsparseprop %s\n", qsp::version());
    std::printf("cpu isa: detected %s, effective %s\n", qsp::to_string(qsp::detected_cpu_isa()),
                qsp::to_string(qsp::effective_cpu_isa()));
    std::printf("oneDNN %d.%d.%d (%s)\n", v->major, v->minor, v->patch, v->hash);
    return 0;
}
