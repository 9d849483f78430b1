// The problem a primitive descriptor describes: which layer, which
// direction, which scheme, which shapes, which pattern. Implementations
// read it; caches of plans and tuning decisions key on it.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>

#include "qsparseprop/primitives.hpp"
#include "runtime/profile.hpp"

namespace qsp::detail {

enum class op_kind { linear, conv2d };
enum class direction { forward, backward_data, backward_weights };
const char *to_string(direction d);

static_assert(static_cast<int>(direction::backward_weights)
                      == static_cast<int>(runtime::profile_direction::backward_weights),
              "direction and profile_direction list the directions in the same order");
// A scope whose time counts as kernel time of direction d (profiling).
inline runtime::profile_scope kernel_time(direction d) {
    return runtime::profile_scope(static_cast<runtime::profile_direction>(d),
                                  runtime::profile_phase::kernel);
}

// A validated Conv2d geometry applied to one input shape.
// (Compared, hashed and described through problem::fields().)
struct conv2d_shape {
    int64_t batch = 0, in_c = 0, in_h = 0, in_w = 0, out_c = 0, out_h = 0, out_w = 0;
    conv2d_geometry g{};
};

// The number of members of an aggregate (brace-initialisable from that many
// values and not one more): how problem.cpp and the tests check that the
// field list names every member.
namespace member_count_detail {
struct any_value {
    template <typename T> operator T() const; // unevaluated only
};
template <typename T, typename... A>
constexpr auto brace_initialisable(int) -> decltype(T{std::declval<A>()...}, true) {
    return true;
}
template <typename T, typename... A> constexpr bool brace_initialisable(...) {
    return false;
}
} // namespace member_count_detail

template <typename T, typename... A> constexpr size_t aggregate_member_count() {
    using member_count_detail::any_value;
    if constexpr (member_count_detail::brace_initialisable<T, A..., any_value>(0))
        return aggregate_member_count<T, A..., any_value>();
    else
        return sizeof...(A);
}

// Which description shows a field (shape_str): both operations' or one.
enum class field_scope { any, linear, conv2d };

// One field of a problem as the list below gives it.
struct problem_field {
    const char *label; // its tag in shape_str(); nullptr: the verbose lines print it themselves
    field_scope scope;
    int64_t value;
};

struct problem {
    op_kind op = op_kind::linear;
    direction dir = direction::forward;
    prop_kind prop = prop_kind::forward_training;
    quant_scheme scheme = quant_scheme::f32;
    csr_pattern pattern;
    // Linear: batch x in -> batch x out. Conv2d: conv.
    int64_t batch = 0, in = 0, out = 0;
    conv2d_shape conv{};
    bool with_bias = false;
    int num_threads = 1;
    conv_vectorization vectorization = conv_vectorization::any; // Conv2d only

    int64_t src_elems() const;
    int64_t dst_elems() const;
    // Output channels, the size of one channel's slice of dst (Linear: out,
    // 1; Conv2d: OC, OH*OW) and the batch in front of them.
    int64_t channels() const { return op == op_kind::linear ? out : conv.out_c; }
    int64_t channel_inner() const { return op == op_kind::linear ? 1 : conv.out_h * conv.out_w; }
    int64_t outer() const { return op == op_kind::linear ? batch : conv.batch; }
    bool needs_workspace() const {
        return scheme == quant_scheme::s8 && prop == prop_kind::forward_training;
    }
    std::string shape_str() const;

    // Every field but the pattern, each once: the one list that operator==,
    // problem_hash, key_bytes() and shape_str() walk (the pattern is compared
    // in full beside it). A field added to problem, conv2d_shape or
    // conv2d_geometry and not listed here fails to compile: problem.cpp
    // counts the structs' members against field_count.
    static constexpr size_t field_count = 28;
    std::array<problem_field, field_count> fields() const;

    // The same problem with the batch size set to 0: what a plan that serves
    // every batch size is specialised for.
    problem without_batch() const;
    // Every field equal, the pattern compared in full (not by its hash).
    bool operator==(const problem &o) const;
    // Every field operator== compares, the pattern in full, as bytes: the
    // key of the problem's entries in the persistent cache.
    std::string key_bytes() const;
};

// Bucket selection for the caches keyed by a problem (and, where a cache
// keys by it too, an ISA): every field and the pattern's hash, mixed once.
struct problem_hash {
    size_t operator()(const problem &p, uint64_t extra = 0) const;
};

} // namespace qsp::detail
