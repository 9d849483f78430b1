// A problem's fields are listed once (problem::fields()): comparison, hash,
// persistent key and description all read that list. These tests change each
// member of problem, conv2d_shape and conv2d_geometry in turn and check the
// list sees exactly that change; the member counts are checked at compile
// time, so a member added to a struct and not to the list fails the build.
#include <functional>
#include <set>

#include <gtest/gtest.h>

#include "primitives/core/problem.hpp"

namespace qsp::test {

namespace {

using detail::problem;

static_assert(detail::aggregate_member_count<problem>() == 12,
              "problem gained or lost a member: list it in problem::fields()");
static_assert(detail::aggregate_member_count<detail::conv2d_shape>() == 8,
              "conv2d_shape gained or lost a member: list it in problem::fields()");
static_assert(detail::aggregate_member_count<conv2d_geometry>() == 11,
              "conv2d_geometry gained or lost a member: list it in problem::fields()");

problem base_problem() {
    problem p;
    p.pattern = csr_pattern::from_indices(2, 3, {0, 1, 3}, {2, 0, 1});
    p.batch = 4;
    p.in = 3;
    p.out = 2;
    p.conv = {5, 6, 7, 8, 9, 10, 11, conv2d_geometry{3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1}};
    p.num_threads = 2;
    return p;
}

// One change per member (the pattern's are below): every member but the
// pattern and the nested structs themselves.
const std::vector<std::pair<const char *, std::function<void(problem &)>>> &member_changes() {
    static const std::vector<std::pair<const char *, std::function<void(problem &)>>> changes = {
            {"op", [](problem &p) { p.op = detail::op_kind::conv2d; }},
            {"dir", [](problem &p) { p.dir = detail::direction::backward_data; }},
            {"prop", [](problem &p) { p.prop = prop_kind::forward_inference; }},
            {"scheme", [](problem &p) { p.scheme = quant_scheme::s8; }},
            {"batch", [](problem &p) { ++p.batch; }},
            {"in", [](problem &p) { ++p.in; }},
            {"out", [](problem &p) { ++p.out; }},
            {"conv.batch", [](problem &p) { ++p.conv.batch; }},
            {"conv.in_c", [](problem &p) { ++p.conv.in_c; }},
            {"conv.in_h", [](problem &p) { ++p.conv.in_h; }},
            {"conv.in_w", [](problem &p) { ++p.conv.in_w; }},
            {"conv.out_c", [](problem &p) { ++p.conv.out_c; }},
            {"conv.out_h", [](problem &p) { ++p.conv.out_h; }},
            {"conv.out_w", [](problem &p) { ++p.conv.out_w; }},
            {"kernel_h", [](problem &p) { ++p.conv.g.kernel_h; }},
            {"kernel_w", [](problem &p) { ++p.conv.g.kernel_w; }},
            {"stride_h", [](problem &p) { ++p.conv.g.stride_h; }},
            {"stride_w", [](problem &p) { ++p.conv.g.stride_w; }},
            {"pad_top", [](problem &p) { ++p.conv.g.pad_top; }},
            {"pad_left", [](problem &p) { ++p.conv.g.pad_left; }},
            {"pad_bottom", [](problem &p) { ++p.conv.g.pad_bottom; }},
            {"pad_right", [](problem &p) { ++p.conv.g.pad_right; }},
            {"dilation_h", [](problem &p) { ++p.conv.g.dilation_h; }},
            {"dilation_w", [](problem &p) { ++p.conv.g.dilation_w; }},
            {"groups", [](problem &p) { ++p.conv.g.groups; }},
            {"with_bias", [](problem &p) { p.with_bias = !p.with_bias; }},
            {"num_threads", [](problem &p) { ++p.num_threads; }},
            {"vectorization", [](problem &p) { p.vectorization = conv_vectorization::batch; }},
    };
    return changes;
}

TEST(ProblemFields, TheListNamesEveryMemberOnce) {
    // As many changes as listed fields, and each change moves exactly one
    // field of the list, each a different one: the list is the members.
    ASSERT_EQ(member_changes().size(), problem::field_count);
    const problem base = base_problem();
    const auto before = base.fields();
    std::set<size_t> moved;
    for (const auto &[member, change] : member_changes()) {
        problem p = base;
        change(p);
        const auto after = p.fields();
        std::vector<size_t> differing;
        for (size_t i = 0; i < problem::field_count; ++i)
            if (after[i].value != before[i].value) differing.push_back(i);
        ASSERT_EQ(differing.size(), 1u) << member << " moves " << differing.size() << " fields";
        EXPECT_TRUE(moved.insert(differing[0]).second)
                << member << " shares field " << differing[0];
    }
}

TEST(ProblemFields, EveryMemberReachesComparisonKeyAndHash) {
    const problem base = base_problem();
    const std::string base_key = base.key_bytes();
    std::set<size_t> hashes{detail::problem_hash()(base)};
    for (const auto &[member, change] : member_changes()) {
        problem p = base;
        change(p);
        EXPECT_FALSE(p == base) << member << " is not compared";
        EXPECT_NE(p.key_bytes(), base_key) << member << " is not in the persistent key";
        hashes.insert(detail::problem_hash()(p));
        problem same = base;
        change(same);
        EXPECT_TRUE(same == p) << member;
        EXPECT_EQ(same.key_bytes(), p.key_bytes()) << member;
        EXPECT_EQ(detail::problem_hash()(same), detail::problem_hash()(p)) << member;
    }
    // The hash only picks a bucket; it should still tell these apart.
    EXPECT_EQ(hashes.size(), member_changes().size() + 1);
    // An extra word (the ISA of the tuner's and plan caches' keys) moves it.
    EXPECT_NE(detail::problem_hash()(base, 1), detail::problem_hash()(base, 2));
}

TEST(ProblemFields, ThePatternIsComparedInFull) {
    const problem base = base_problem();
    problem other = base;
    other.pattern = csr_pattern::from_indices(2, 3, {0, 1, 3}, {1, 0, 1});
    EXPECT_FALSE(other == base);
    EXPECT_NE(other.key_bytes(), base.key_bytes());
}

TEST(ProblemFields, TheDescriptionShowsTheOperationsShape) {
    problem p = base_problem();
    EXPECT_EQ(p.shape_str().substr(0, 9), "mb4ic3oc2");
    p.op = detail::op_kind::conv2d;
    const std::string conv = p.shape_str();
    EXPECT_EQ(conv.substr(0, conv.find(',')),
              "mb5_ic6ih7iw8_oc9oh10ow11_kh3kw3sh1sw1pt1pl1pb1pr1dh1dw1g1");
    p.vectorization = conv_vectorization::output_width;
    EXPECT_NE(p.shape_str().find(",vectorization=output_width"), std::string::npos);
}

} // namespace

} // namespace qsp::test
