// Runtime controls: CPU ISA detection and cap, verbose levels, the sizes of
// the in-memory caches and of the scratch memory pool, version.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qsp {

// Ordered: every level includes the ones before it.
enum class cpu_isa { ref = 0, avx2 = 1, avx512_core = 2, avx512_core_vnni = 3 };

const char *to_string(cpu_isa isa);
// Parses "ref", "avx2", "avx512_core", "avx512_vnni"/"avx512_core_vnni"
// (case-insensitive); throws std::invalid_argument listing the accepted names.
cpu_isa cpu_isa_from_string(const std::string &name);

// What this CPU supports, ignoring any cap.
cpu_isa detected_cpu_isa();
// AVX-VNNI (VEX vpdpbusd on ymm), detected.
bool cpu_has_avx_vnni();
// Whether the AVX2 tier's int8 kernels use AVX-VNNI (instead of 16-bit pair
// products or the emulated dot product): the CPU has it and the cap allows
// it. A cap of avx2 is oneDNN's AVX2, without VNNI, so that the three
// libraries capped to AVX2 stand for an AVX2 CPU without it (Zen 3,
// Haswell); "avx2_vnni" (or any cap above avx2) allows it.
bool avx_vnni_usable();
// min(detected, cap); the cap comes from set_max_cpu_isa() or, at first use,
// from the QSP_MAX_CPU_ISA environment variable (set_max_cpu_isa's names).
cpu_isa effective_cpu_isa();
// avx2 and below: no AVX-VNNI; above: AVX-VNNI where the CPU has it.
void set_max_cpu_isa(cpu_isa cap);
void set_max_cpu_isa(cpu_isa cap, bool avx_vnni);
// By name: cpu_isa_from_string's names, or "avx2_vnni" (avx2 with
// AVX-VNNI); throws std::invalid_argument listing them.
void set_max_cpu_isa(const std::string &name);

// The largest OpenMP team a primitive accepts (primitive_attr::num_threads):
// 4x the processors, at least 256. Far larger teams make the OpenMP runtime
// fail inside its own code (70 000 crashed libgomp), so they are refused.
int max_num_threads();

// 0 = quiet, 1 = one line per primitive creation / execution,
// 2 = also why faster implementations were skipped (QSP_VERBOSE=dispatch).
int verbose_level();
void set_verbose_level(int level);

const char *version();

// ---- caches --------------------------------------------------------------
// Every in-memory cache is an LRU bounded by its capacity (entries; from
// QSP_CACHE_CAPACITY, default 1024) and compares its keys in full.
// A cache holds at most `capacity` values and `memory_limit` bytes of them;
// beyond either it lets go of the least recently used: a value still in use
// (a primitive holds it) stays alive and is found again, one nobody uses is
// freed. So a layer's plans and generated code go when its last primitive
// goes, except what the bounds keep for reuse.
struct cache_info {
    std::string name;              // "jit_code:spmm", "jit_plan", "tuning_decisions", ...
    size_t size = 0, capacity = 0; // values held by the cache
    uint64_t hits = 0, misses = 0, generations = 0, evictions = 0;
    size_t bytes = 0, memory_limit = 0; // of the values held (their memory_bytes())
    size_t in_use_elsewhere = 0;        // let go of by the cache, still used by primitives
};
std::vector<cache_info> cache_infos();
// Empties every cache (primitives already created keep what they hold).
void clear_caches();
// Sets the capacity of every cache, and of those created later (entries;
// 0 keeps nothing that is not in use).
void set_cache_capacity(size_t entries);
// The capacity caches are created with (QSP_CACHE_CAPACITY, or the last
// set_cache_capacity()).
size_t cache_capacity();
// Sets the byte bound of the code and plan caches, and of those created later
// (0 keeps nothing that is not in use); the tuning decisions (a few bytes
// each, held by no primitive) are bounded by count only.
void set_cache_memory_limit(size_t bytes);
// The byte bound caches are created with (QSP_CACHE_MEMORY_MB, default 64
// MiB, or the last set_cache_memory_limit()).
size_t cache_memory_limit();

// ---- persistent cache --------------------------------------------------------
// Tuning decisions (and the timings behind them) also go to disk, so a
// restarted job or another worker on the same kind of machine starts with
// them: QSP_CACHE_DIR (default $XDG_CACHE_HOME/qsparseprop, else
// ~/.cache/qsparseprop; "" turns it off), capped at QSP_CACHE_MAX_MB (default
// 256) with least-recently-used eviction. It holds data, never machine code.
// An entry is used only when its checksum, format, library version, CPU and
// full key match; anything else is ignored (a verbose line) and rebuilt. A
// directory that is a symbolic link, another user's, writable by others, not
// writable, or under a folder another user could change turns the cache off (reason in
// persistent_cache_status()); the library works the same without it.
struct persistent_cache_info {
    bool enabled = false;
    std::string dir;    // where it is (or would be)
    std::string reason; // why it is off; "" when on
    size_t entries = 0, bytes = 0, max_bytes = 0;
};
persistent_cache_info persistent_cache_status();
// Uses dir from now on ("" turns the cache off), over QSP_CACHE_DIR; a
// missing directory is created user-only (0700).
void set_persistent_cache_dir(const std::string &dir);
// Removes every entry; returns how many.
size_t clear_persistent_cache();
// Reads every entry and removes the ones that would not be used (damaged,
// another version or CPU); each listed in problems.
struct persistent_cache_check {
    size_t valid = 0, removed = 0;
    std::vector<std::string> problems;
};
persistent_cache_check check_persistent_cache();
// Entries of a front end's own (the Python swap keeps its dense-vs-sparse
// decisions here): the payload stored for (kind, key), compared in full,
// under the same rules; nothing when absent or not to be trusted.
std::optional<std::string> persistent_cache_load(const std::string &kind, const std::string &key);
void persistent_cache_store(const std::string &kind, const std::string &key,
                            const std::string &payload);

// ---- scratch memory --------------------------------------------------------
// Executions borrow scratch buffers from one pool and give them back when
// they finish, so layers share memory instead of each keeping its own. The
// pool keeps at most `capacity_bytes` of idle buffers (QSP_SCRATCH_CAPACITY_MB,
// default 256 MiB); a larger idle remainder (say, after one huge layer) is
// returned to the system at once.
struct scratch_info {
    size_t idle_bytes = 0;     // kept for reuse
    size_t in_use_bytes = 0;   // lent to running executions
    size_t capacity_bytes = 0; // most idle bytes kept
    size_t peak_bytes = 0;     // most bytes held at once (idle + in use)
};
scratch_info scratch_pool_info();
void set_scratch_capacity(size_t bytes);
// Returns every idle buffer to the system now.
void release_scratch();

// ---- profiling ----------------------------------------------------------------
// Per direction, summed over executions since the last clear_profile(): the
// executions' total time and the part inside the sparse kernels' parallel
// regions (total - kernel: the passes — packing, quantization, transposes —
// and the call). Off unless set_profiling(true) or QSP_PROFILE=1; off, it
// costs one atomic load per execution.
struct profile_entry {
    std::string direction; // forward, backward_data, backward_weights
    int64_t calls = 0;
    double total_ms = 0, kernel_ms = 0;
};
void set_profiling(bool on);
bool profiling();
std::vector<profile_entry> profile_info();
void clear_profile();

// Memory for outputs that outlive the call producing them (a tensor handed
// to a framework, freed whenever the framework frees it), lent by the same
// pool: a fresh multi-MB output costs a page fault per 4 KiB page every
// step, a recycled one does not. 64-byte aligned; at least `bytes` (>= 1).
// Give it back with release_output_buffer (and nothing else); counted as in
// use until then.
void *acquire_output_buffer(size_t bytes);
void release_output_buffer(void *buffer);

} // namespace qsp
