// Hooks for tests only: they change behaviour no user should change.
#pragma once

#include <cstdint>

namespace qsp::detail {

// While on, patterns built report `value` as their hash() (for their whole
// life): two layers then share every hashed field, and each must still get
// its own plans and decisions (caches compare the patterns themselves).
void force_pattern_hash_for_testing(bool on, uint64_t value = 0);

// How many forward executions so far had a kernel take dst's batch
// statistics in its epilogue (tensors::dst_statistics written): tests tell
// the epilogue from the core's pass by it.
int64_t epilogue_statistics_taken_for_testing();

} // namespace qsp::detail
