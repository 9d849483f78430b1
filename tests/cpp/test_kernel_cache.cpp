// The kernel cache: one generation per key under concurrency, LRU eviction,
// failed generations leave no entry.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/kernel_cache.hpp"

namespace qsp::test {

using runtime::kernel_cache;
using runtime::kernel_key;

namespace {
kernel_key key_of(int i) {
    return kernel_key{"test_op", 0, {i, 2 * i}, 0, 1, 2, uint64_t(i) * 77};
}
} // namespace

TEST(KernelCache, eight_threads_generate_each_key_once) {
    kernel_cache<int> cache(64);
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
    const auto s = cache.stats();
    EXPECT_EQ(s.generations, 4u);
    EXPECT_EQ(s.misses, 4u);
    EXPECT_EQ(s.hits, 8u * 40u - 4u);
}

TEST(KernelCache, evicts_least_recently_used_at_capacity) {
    kernel_cache<int> cache(2);
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
    EXPECT_EQ(cache.stats().evictions, 2u);
    cache.set_capacity(0);
    EXPECT_EQ(cache.size(), 0u);
}

TEST(KernelCache, failed_generation_leaves_no_entry) {
    kernel_cache<int> cache(4);
    EXPECT_THROW(cache.get_or_create(
                         key_of(1),
                         []() -> std::shared_ptr<const int> { throw std::runtime_error("boom"); }),
                 std::runtime_error);
    EXPECT_EQ(cache.size(), 0u);
    EXPECT_EQ(*cache.get_or_create(key_of(1), [] { return std::make_shared<const int>(5); }), 5);
}

TEST(KernelCache, keys_differ_in_every_field) {
    kernel_key a = key_of(1);
    auto differs = [&](auto mutate) {
        kernel_key b = a;
        mutate(b);
        return !(a == b);
    };
    EXPECT_TRUE(differs([](kernel_key &k) { k.op = "x"; }));
    EXPECT_TRUE(differs([](kernel_key &k) { k.direction = 2; }));
    EXPECT_TRUE(differs([](kernel_key &k) { k.shape.push_back(1); }));
    EXPECT_TRUE(differs([](kernel_key &k) { k.scheme = 1; }));
    EXPECT_TRUE(differs([](kernel_key &k) { k.isa = 3; }));
    EXPECT_TRUE(differs([](kernel_key &k) { k.threads = 9; }));
    EXPECT_TRUE(differs([](kernel_key &k) { k.pattern_hash = 1; }));
}

} // namespace qsp::test
