// The post-op chain of a forward primitive (primitive_attr::ops), applied by
// the core to the output every implementation writes: runs of elementwise
// post-ops in one pass over the output (chunk by chunk while it is in
// cache), batch statistics in a pass of their own. Results do not depend on
// the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "qsparseprop/primitives.hpp"

namespace qsp::detail {

// The tensors of one post-op (those its kind takes; the rest null).
struct post_op_tensors {
    const float *src = nullptr;                 // add
    uint8_t *mask = nullptr;                    // relu (optional)
    float *mean = nullptr, *variance = nullptr; // batch_statistics
    float *range = nullptr; // batch_statistics (optional): lowest, highest per channel
};

// dst is outer x channels x inner (Linear: inner = 1, a row per example).
struct channel_layout {
    int64_t outer = 0, channels = 0, inner = 1;
    int64_t elements() const { return outer * channels * inner; }
};

// From chain[first] on (the ones before it done already).
void apply_post_ops(const std::vector<post_ops::kind> &chain,
                    const std::vector<post_op_tensors> &tensors, float *dst, channel_layout layout,
                    int num_threads, size_t first = 0);

// The reference: each post-op over the whole tensor in its plainest form,
// statistics in double (the oracle of the tests).
void apply_post_ops_reference(const std::vector<post_ops::kind> &chain,
                              const std::vector<post_op_tensors> &tensors, float *dst,
                              channel_layout layout);

} // namespace qsp::detail
