// The LRU cache template behind every cache: one generation per key under
// concurrency, LRU eviction, failed generations leave no entry, keys
// compared in full even when their hashes collide, the byte bound (values
// nobody uses are freed, values in use found again), and the registry that
// qsp::cache_infos() reads.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "qsparseprop/runtime.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::test {

namespace {

struct test_key {
    int a = 0, b = 0;
    bool operator==(const test_key &o) const { return a == o.a && b == o.b; }
};
struct test_key_hash {
    size_t operator()(const test_key &k) const { return static_cast<size_t>(k.a); }
};
// Every key in one bucket: equality alone must tell them apart.
struct colliding_hash {
    size_t operator()(const test_key &) const { return 42; }
};

template <typename hash_t = test_key_hash>
using cache_of = runtime::lru_cache<test_key, int, hash_t>;

test_key key_of(int i) {
    return test_key{i, 2 * i};
}

} // namespace

TEST(LruCache, eight_threads_generate_each_key_once) {
    cache_of<> cache("test:threads", 64);
    std::atomic<int> generations[4] = {};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    std::vector<int> seen(8 * 40);
    for (int t = 0; t < 8; ++t)
        threads.emplace_back([&, t] {
            while (!go.load())
                std::this_thread::yield();
            for (int r = 0; r < 40; ++r) {
                const int k = (t + r) % 4;
                auto v = cache.get_or_create(key_of(k), [&, k] {
                    ++generations[k];
                    std::this_thread::sleep_for(std::chrono::milliseconds(5)); // widen the race
                    return std::make_shared<const int>(1000 + k);
                });
                seen[t * 40 + r] = *v - 1000 == k ? 1 : 0;
            }
        });
    go = true;
    for (auto &th : threads)
        th.join();
    for (int k = 0; k < 4; ++k)
        EXPECT_EQ(generations[k].load(), 1) << "key " << k;
    for (int ok : seen)
        EXPECT_EQ(ok, 1);
    const auto s = cache.info();
    EXPECT_EQ(s.generations, 4u);
    EXPECT_EQ(s.misses, 4u);
    EXPECT_EQ(s.hits, 8u * 40u - 4u);
}

TEST(LruCache, evicts_least_recently_used_at_capacity) {
    cache_of<> cache("test:lru", 2);
    int made = 0;
    auto get = [&](int k) {
        return *cache.get_or_create(key_of(k), [&] {
            ++made;
            return std::make_shared<const int>(k);
        });
    };
    get(1);
    get(2);
    get(1); // 1 is now most recent
    get(3); // evicts 2
    EXPECT_EQ(cache.size(), 2u);
    EXPECT_EQ(made, 3);
    get(1);
    EXPECT_EQ(made, 3) << "1 must still be cached";
    get(2);
    EXPECT_EQ(made, 4) << "2 was evicted and is generated again";
    EXPECT_EQ(cache.info().evictions, 2u);
    cache.set_capacity(0);
    EXPECT_EQ(cache.size(), 0u);
}

TEST(LruCache, failed_generation_leaves_no_entry) {
    cache_of<> cache("test:failure", 4);
    EXPECT_THROW(cache.get_or_create(
                         key_of(1),
                         []() -> std::shared_ptr<const int> { throw std::runtime_error("boom"); }),
                 std::runtime_error);
    EXPECT_EQ(cache.size(), 0u);
    EXPECT_EQ(*cache.get_or_create(key_of(1), [] { return std::make_shared<const int>(5); }), 5);
}

TEST(LruCache, colliding_hashes_still_get_their_own_values) {
    cache_of<colliding_hash> cache("test:collisions", 16);
    for (int i = 0; i < 10; ++i)
        cache.get_or_create(key_of(i), [i] { return std::make_shared<const int>(i); });
    for (int i = 0; i < 10; ++i) {
        bool generated = true;
        EXPECT_EQ(*cache.get_or_create(
                          key_of(i), [] { return std::make_shared<const int>(-1); }, &generated),
                  i);
        EXPECT_FALSE(generated);
    }
    EXPECT_EQ(cache.find(test_key{3, 7}), nullptr) << "same bucket, different key";
}

TEST(LruCache, registry_reports_and_bounds_every_cache) {
    cache_of<> cache("test:registry", 3);
    for (int i = 0; i < 5; ++i)
        cache.get_or_create(key_of(i), [i] { return std::make_shared<const int>(i); });
    bool found = false;
    for (const cache_info &c : cache_infos())
        if (c.name == "test:registry") {
            found = true;
            EXPECT_EQ(c.size, 3u);
            EXPECT_EQ(c.capacity, 3u);
            EXPECT_EQ(c.evictions, 2u);
            EXPECT_EQ(c.misses, 5u);
        }
    EXPECT_TRUE(found);
    clear_caches();
    EXPECT_EQ(cache.size(), 0u);
    cache.put(key_of(1), std::make_shared<const int>(11));
    EXPECT_EQ(*cache.find(key_of(1)), 11);
}

namespace {
// A value standing for `bytes` of memory (a plan, generated code).
struct sized {
    size_t bytes;
    size_t memory_bytes() const { return bytes; }
};
} // namespace

TEST(LruCache, bounded_in_bytes_and_what_nobody_uses_is_freed) {
    runtime::lru_cache<test_key, sized, test_key_hash> cache("test:bytes", 100, 1000);
    int made = 0;
    auto make = [&](size_t bytes) {
        return [&made, bytes] {
            ++made;
            return std::make_shared<const sized>(sized{bytes});
        };
    };
    auto in_use = cache.get_or_create(key_of(1), make(600)); // a primitive holds it
    std::weak_ptr<const sized> watch_2 = cache.get_or_create(key_of(2), make(300));
    EXPECT_EQ(cache.info().bytes, 900u);
    EXPECT_FALSE(watch_2.expired()) << "held by the cache within its bounds";
    cache.get_or_create(key_of(3), make(300)); // 1200 > 1000: lets go of 1, the least recent
    const cache_info i = cache.info();
    EXPECT_EQ(i.bytes, 600u);
    EXPECT_EQ(i.size, 2u);
    EXPECT_EQ(i.in_use_elsewhere, 1u);
    EXPECT_LE(i.bytes, i.memory_limit);
    // still in use: found again without generating, and held again
    EXPECT_EQ(cache.get_or_create(key_of(1), make(600)), in_use);
    EXPECT_EQ(made, 3);
    // a limit of 0 keeps nothing nobody uses: 2 and 3 are freed at once
    cache.set_memory_limit(0);
    EXPECT_TRUE(watch_2.expired()) << "freed when the cache let go and nobody used it";
    EXPECT_EQ(cache.info().bytes, 0u);
    EXPECT_EQ(cache.info().in_use_elsewhere, 1u);
    // the last user goes: so does the value, and the entry with it
    std::weak_ptr<const sized> watch_1 = in_use;
    in_use.reset();
    EXPECT_TRUE(watch_1.expired());
    EXPECT_EQ(cache.find(key_of(1)), nullptr);
    EXPECT_EQ(cache.info().in_use_elsewhere, 0u);
    cache.get_or_create(key_of(1), make(600));
    EXPECT_EQ(made, 4) << "generated again once freed";
}

TEST(LruCache, memory_limit_from_the_environment_and_the_setter) {
    setenv("QSP_CACHE_MEMORY_MB", "3", 1);
    EXPECT_EQ(runtime::default_cache_memory_limit(), size_t(3) << 20);
    setenv("QSP_CACHE_MEMORY_MB", "much", 1);
    EXPECT_THROW(runtime::default_cache_memory_limit(), std::invalid_argument);
    unsetenv("QSP_CACHE_MEMORY_MB");
    EXPECT_EQ(runtime::default_cache_memory_limit(), size_t(64) << 20);
    cache_of<> cache("test:limit");
    set_cache_memory_limit(12345);
    EXPECT_EQ(cache.info().memory_limit, 12345u);
    EXPECT_EQ(cache_memory_limit(), 12345u);
    set_cache_memory_limit(size_t(64) << 20);
}

TEST(LruCache, capacity_from_the_environment_is_validated) {
    setenv("QSP_CACHE_CAPACITY", "12", 1);
    EXPECT_EQ(runtime::default_cache_capacity(), 12u);
    setenv("QSP_CACHE_CAPACITY", "lots", 1);
    EXPECT_THROW(runtime::default_cache_capacity(), std::invalid_argument);
    setenv("QSP_CACHE_CAPACITY", "-1", 1);
    EXPECT_THROW(runtime::default_cache_capacity(), std::invalid_argument);
    unsetenv("QSP_CACHE_CAPACITY");
    EXPECT_EQ(runtime::default_cache_capacity(), 1024u);
}

} // namespace qsp::test
