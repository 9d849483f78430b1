#include "runtime/profile.hpp"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "qsparseprop/runtime.hpp"

namespace qsp::runtime {

namespace {

constexpr int directions = 3, phases = 2;

struct counters {
    std::atomic<int64_t> calls[directions][phases]{};
    std::atomic<int64_t> ns[directions][phases]{};
};

counters &the_counters() {
    static counters *c = new counters; // leaked: executions may end during exit
    return *c;
}

std::atomic<bool> &enabled_flag() {
    static std::atomic<bool> on{[] {
        const char *e = std::getenv("QSP_PROFILE");
        const char *v = std::getenv("QSP_VERBOSE");
        return (e && std::strcmp(e, "0") != 0 && std::strcmp(e, "") != 0)
               || (v && std::strcmp(v, "profile") == 0);
    }()};
    return on;
}

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
            .count();
}

} // namespace

bool profiling_enabled() {
    return enabled_flag().load(std::memory_order_relaxed);
}

profile_scope::profile_scope(profile_direction d, profile_phase p) : d_(d), p_(p) {
    if (profiling_enabled()) start_ns_ = now_ns();
}

namespace {
thread_local int64_t thread_kernel_ns = 0;
} // namespace

profile_scope::~profile_scope() {
    if (start_ns_ < 0) return;
    counters &c = the_counters();
    const int d = static_cast<int>(d_), p = static_cast<int>(p_);
    const int64_t ns = now_ns() - start_ns_;
    c.calls[d][p].fetch_add(1, std::memory_order_relaxed);
    c.ns[d][p].fetch_add(ns, std::memory_order_relaxed);
    if (p_ == profile_phase::kernel) thread_kernel_ns += ns;
}

int64_t take_thread_kernel_ns() {
    const int64_t ns = thread_kernel_ns;
    thread_kernel_ns = 0;
    return ns;
}

} // namespace qsp::runtime

namespace qsp {

void set_profiling(bool on) {
    runtime::enabled_flag().store(on, std::memory_order_relaxed);
}

bool profiling() {
    return runtime::profiling_enabled();
}

std::vector<profile_entry> profile_info() {
    static const char *const names[] = {"forward", "backward_data", "backward_weights"};
    runtime::counters &c = runtime::the_counters();
    std::vector<profile_entry> out;
    for (int d = 0; d < runtime::directions; ++d) {
        profile_entry e;
        e.direction = names[d];
        e.calls = c.calls[d][0].load();
        e.total_ms = static_cast<double>(c.ns[d][0].load()) * 1e-6;
        e.kernel_ms = static_cast<double>(c.ns[d][1].load()) * 1e-6;
        out.push_back(e);
    }
    return out;
}

void clear_profile() {
    runtime::counters &c = runtime::the_counters();
    for (int d = 0; d < runtime::directions; ++d)
        for (int p = 0; p < runtime::phases; ++p) {
            c.calls[d][p].store(0);
            c.ns[d][p].store(0);
        }
}

} // namespace qsp
