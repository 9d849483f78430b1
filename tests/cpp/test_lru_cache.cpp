// The LRU cache template behind every cache: one generation per key under
// concurrency, LRU eviction, failed generations leave no entry, keys
// compared in full even when their hashes collide, and the registry that
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
