// Runtime controls: CPU ISA detection and cap, verbose levels, version.
#pragma once

#include <string>

namespace qsp {

// Ordered: every level includes the ones before it.
enum class cpu_isa { ref = 0, avx2 = 1, avx512_core = 2, avx512_core_vnni = 3 };

const char *to_string(cpu_isa isa);
// Parses "ref", "avx2", "avx512_core", "avx512_vnni"/"avx512_core_vnni"
// (case-insensitive); throws std::invalid_argument listing the accepted names.
cpu_isa cpu_isa_from_string(const std::string &name);

// What this CPU supports, ignoring any cap.
cpu_isa detected_cpu_isa();
// AVX-VNNI (VEX vpdpbusd on ymm): used by the AVX2 tier's int8 kernels
// instead of their emulated dot products. Detected, not capped.
bool cpu_has_avx_vnni();
// min(detected, cap); the cap comes from set_max_cpu_isa() or, at first use,
// from the QSP_MAX_CPU_ISA environment variable.
cpu_isa effective_cpu_isa();
void set_max_cpu_isa(cpu_isa cap);

// 0 = quiet, 1 = one line per primitive creation / execution,
// 2 = also why faster implementations were skipped (QSP_VERBOSE=dispatch).
int verbose_level();
void set_verbose_level(int level);

const char *version();

} // namespace qsp
