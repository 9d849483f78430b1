// The scratch pool: buffers are reused across executions, concurrent
// executions get distinct buffers, and idle memory beyond the capacity is
// returned to the system (a huge one-off layer leaves nothing resident).
#include <cstring>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "qsparseprop/runtime.hpp"
#include "runtime/scratch_pool.hpp"
#include "test_utils.hpp"

namespace qsp::test {

namespace {

size_t resident_bytes() {
    std::ifstream statm("/proc/self/statm");
    size_t pages = 0, resident = 0;
    statm >> pages >> resident;
    return resident * 4096;
}

} // namespace

TEST(ScratchPool, buffers_are_reused_between_executions) {
    release_scratch();
    void *first = nullptr;
    {
        runtime::scratchpad sp;
        first = sp.get<float>(0, 1 << 20);
        static_cast<float *>(first)[0] = 1.f;
    }
    const scratch_info after = scratch_pool_info();
    EXPECT_GE(after.idle_bytes, size_t(4) << 20);
    EXPECT_EQ(after.in_use_bytes, 0u);
    runtime::scratchpad sp;
    EXPECT_EQ(sp.get<float>(3, 1 << 19), first) << "the idle buffer serves a smaller request";
}

TEST(ScratchPool, concurrent_executions_get_distinct_buffers) {
    std::vector<std::thread> threads;
    std::vector<int> ok(4, 0);
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([t, &ok] {
            for (int round = 0; round < 50; ++round) {
                runtime::scratchpad sp;
                int *a = sp.get<int>(0, 4096 + t);
                int *b = sp.get<int>(1, 100);
                for (int i = 0; i < 4096; ++i)
                    a[i] = t * 100000 + i;
                b[0] = t;
                std::this_thread::yield();
                bool good = b[0] == t;
                for (int i = 0; i < 4096; ++i)
                    good = good && a[i] == t * 100000 + i;
                ok[t] += good;
            }
        });
    for (auto &th : threads)
        th.join();
    for (int t = 0; t < 4; ++t)
        EXPECT_EQ(ok[t], 50) << "thread " << t;
}

TEST(ScratchPool, a_huge_one_off_execution_leaves_nothing_resident) {
    release_scratch();
    const size_t capacity = scratch_pool_info().capacity_bytes;
    const size_t huge = capacity + (size_t(300) << 20);
    const size_t before = resident_bytes();
    {
        runtime::scratchpad sp;
        auto *p = static_cast<unsigned char *>(sp.bytes(0, huge));
        for (size_t i = 0; i < huge; i += 4096)
            p[i] = 1; // make it resident
        EXPECT_GE(resident_bytes(), before + huge - (size_t(16) << 20));
    }
    EXPECT_LE(scratch_pool_info().idle_bytes, capacity);
    EXPECT_LT(resident_bytes(), before + (size_t(64) << 20))
            << "the buffer beyond the pool's capacity went back to the system";
    EXPECT_GE(scratch_pool_info().peak_bytes, huge);
}

TEST(ScratchPool, capacity_can_be_lowered_and_idle_memory_released) {
    {
        runtime::scratchpad sp;
        sp.bytes(0, size_t(8) << 20);
        sp.bytes(1, size_t(8) << 20);
    }
    EXPECT_GE(scratch_pool_info().idle_bytes, size_t(16) << 20);
    const size_t capacity = scratch_pool_info().capacity_bytes;
    set_scratch_capacity(size_t(9) << 20);
    EXPECT_LE(scratch_pool_info().idle_bytes, size_t(9) << 20);
    release_scratch();
    EXPECT_EQ(scratch_pool_info().idle_bytes, 0u);
    set_scratch_capacity(capacity);
    EXPECT_THROW(runtime::scratchpad().bytes(10, 1), std::logic_error);
}

} // namespace qsp::test

namespace qsp::test {

// Output buffers outlive calls: in use until released, then idle and handed
// out again (no fresh pages), 64-byte aligned, their size remembered.
TEST(ScratchPool, output_buffers_are_lent_and_recycled) {
    release_scratch();
    const size_t before = scratch_pool_info().in_use_bytes;
    void *a = acquire_output_buffer(3 << 20);
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
    std::memset(a, 1, 3 << 20); // all of it is usable
    EXPECT_GE(scratch_pool_info().in_use_bytes, before + (3 << 20));
    release_output_buffer(a);
    EXPECT_EQ(scratch_pool_info().in_use_bytes, before);
    EXPECT_GE(scratch_pool_info().idle_bytes, size_t(3) << 20);
    void *b = acquire_output_buffer(2 << 20); // fits the idle one: recycled
    EXPECT_EQ(b, a);
    release_output_buffer(b);
    release_output_buffer(nullptr); // harmless
    release_scratch();
    EXPECT_EQ(scratch_pool_info().idle_bytes, 0u);
}

} // namespace qsp::test
