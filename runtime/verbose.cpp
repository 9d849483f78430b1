#include "runtime/verbose.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "qsparseprop/runtime.hpp"

namespace qsp {

namespace {

std::atomic<int> level{-1};

int level_from_env() {
    const char *env = std::getenv("QSP_VERBOSE");
    if (!env || !*env) return 0;
    if (std::strcmp(env, "dispatch") == 0 || std::strcmp(env, "all") == 0) return 2;
    if (std::strcmp(env, "profile") == 0) return 1; // exec lines, with profiling on (profile.cpp)
    return std::atoi(env) > 0 ? std::atoi(env) : 0;
}

} // namespace

int verbose_level() {
    int l = level.load();
    if (l < 0) {
        level.compare_exchange_strong(l, level_from_env());
        l = level.load();
    }
    return l;
}

void set_verbose_level(int l) {
    level.store(l < 0 ? 0 : l);
}

namespace runtime {

void verbose_print(const std::string &line) {
    static std::mutex m;
    std::lock_guard<std::mutex> lock(m);
    std::printf("qsp_verbose,%s\n", line.c_str());
    std::fflush(stdout);
}

} // namespace runtime
} // namespace qsp
