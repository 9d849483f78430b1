// The registry of every live cache, for cache_infos() / clear_caches().
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "runtime/env.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::runtime {

namespace {

struct registry {
    std::mutex mutex;
    std::vector<cache_base *> caches;
};

// Leaked on purpose: caches are function-local statics of other files and
// may be destroyed after a registry that is itself a static.
registry &the_registry() {
    static registry *r = new registry;
    return *r;
}

// Set by set_cache_capacity() / set_cache_memory_limit(): also the bounds of
// caches created later.
std::atomic<long long> capacity_override{-1};
std::atomic<long long> memory_limit_override{-1};

} // namespace

cache_base::cache_base(std::string name) : name_(std::move(name)) {
    registry &r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.caches.push_back(this);
}

cache_base::~cache_base() {
    registry &r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.caches.erase(std::remove(r.caches.begin(), r.caches.end(), this), r.caches.end());
}

size_t default_cache_capacity() {
    const long long o = capacity_override.load();
    if (o >= 0) return static_cast<size_t>(o);
    // 0 keeps nothing
    return static_cast<size_t>(env_integer("QSP_CACHE_CAPACITY", 1024, 0, 1ll << 40, "entries"));
}

size_t default_cache_memory_limit() {
    const long long o = memory_limit_override.load();
    if (o >= 0) return static_cast<size_t>(o);
    return static_cast<size_t>(env_integer("QSP_CACHE_MEMORY_MB", 64, 0, 1ll << 30, "MiB")) << 20;
}

namespace {
// Calls fn on every live cache, under the registry's lock.
template <typename fn_t> void for_each_cache(fn_t fn) {
    registry &r = the_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    for (cache_base *c : r.caches)
        fn(*c);
}
} // namespace

} // namespace qsp::runtime

namespace qsp {

std::vector<cache_info> cache_infos() {
    std::vector<cache_info> out;
    runtime::for_each_cache([&](const runtime::cache_base &c) { out.push_back(c.info()); });
    std::sort(out.begin(), out.end(),
              [](const cache_info &a, const cache_info &b) { return a.name < b.name; });
    return out;
}

void clear_caches() {
    runtime::for_each_cache([](runtime::cache_base &c) { c.clear(); });
}

size_t cache_capacity() {
    return runtime::default_cache_capacity();
}

void set_cache_capacity(size_t entries) {
    runtime::capacity_override.store(static_cast<long long>(entries));
    runtime::for_each_cache([entries](runtime::cache_base &c) { c.set_capacity(entries); });
}

size_t cache_memory_limit() {
    return runtime::default_cache_memory_limit();
}

void set_cache_memory_limit(size_t bytes) {
    runtime::memory_limit_override.store(static_cast<long long>(bytes));
    runtime::for_each_cache([bytes](runtime::cache_base &c) { c.set_memory_limit(bytes); });
}

} // namespace qsp
