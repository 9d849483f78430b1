#include "jit/jit_reduce16.hpp"

#include <stdexcept>
#include <utility>

namespace qsp::jit {

namespace {

using lanes = std::array<int, 16>;

// The shuffles' semantics on lane labels, to compute where each sum lands.
lanes lanes_shuff32x4(const lanes &a, const lanes &b, int imm) {
    lanes r{};
    for (int q = 0; q < 4; ++q) {
        const lanes &s = q < 2 ? a : b;
        const int from = (imm >> (2 * q)) & 3;
        for (int e = 0; e < 4; ++e)
            r[q * 4 + e] = s[from * 4 + e];
    }
    return r;
}

lanes lanes_shufps(const lanes &a, const lanes &b, int imm) {
    lanes r{};
    for (int q = 0; q < 4; ++q)
        for (int e = 0; e < 4; ++e) {
            const lanes &s = e < 2 ? a : b;
            r[q * 4 + e] = s[q * 4 + ((imm >> (2 * e)) & 3)];
        }
    return r;
}

lanes lanes_add(const lanes &x, const lanes &y) {
    if (x != y) throw std::logic_error("reduce16: the tree mixes different inputs");
    return x;
}

struct tree_step {
    bool whole_quarters; // vshuff32x4 (true) or vshufps (false)
    int imm_a, imm_b;
};
constexpr tree_step tree[4] = {
        {true, 0x44, 0xEE}, {true, 0x88, 0xDD}, {false, 0x44, 0xEE}, {false, 0x88, 0xDD}};

std::array<int32_t, 16> simulate() {
    std::array<lanes, 16> v{};
    for (int j = 0; j < 16; ++j)
        v[j].fill(j);
    int count = 16;
    for (const tree_step &s : tree) {
        for (int j = 0; j < count / 2; ++j) {
            const lanes &a = v[2 * j], &b = v[2 * j + 1];
            v[j] = s.whole_quarters
                           ? lanes_add(lanes_shuff32x4(a, b, s.imm_a),
                                       lanes_shuff32x4(a, b, s.imm_b))
                           : lanes_add(lanes_shufps(a, b, s.imm_a), lanes_shufps(a, b, s.imm_b));
        }
        count /= 2;
    }
    std::array<int32_t, 16> lane_of{};
    for (int lane = 0; lane < 16; ++lane)
        lane_of[v[0][lane]] = lane;
    return lane_of;
}

} // namespace

const std::array<int32_t, 16> &reduce16_lane_of() {
    static const std::array<int32_t, 16> lane_of = simulate();
    return lane_of;
}

int emit_reduce16(Xbyak::CodeGenerator &g, reduce16_kind kind, const Xbyak::Zmm &perm) {
    using Xbyak::Zmm;
    const Zmm tmp_a(24), tmp_b(25);
    // Float shuffles move integer lanes bit for bit; only the adds differ.
    int count = 16, in_base = 0, out_base = 16;
    for (const tree_step &s : tree) {
        for (int j = 0; j < count / 2; ++j) {
            const Zmm a(in_base + 2 * j), b(in_base + 2 * j + 1);
            if (s.whole_quarters) {
                g.vshuff32x4(tmp_a, a, b, s.imm_a);
                g.vshuff32x4(tmp_b, a, b, s.imm_b);
            } else {
                g.vshufps(tmp_a, a, b, s.imm_a);
                g.vshufps(tmp_b, a, b, s.imm_b);
            }
            if (kind == reduce16_kind::f32)
                g.vaddps(Zmm(out_base + j), tmp_a, tmp_b);
            else
                g.vpaddd(Zmm(out_base + j), tmp_a, tmp_b);
        }
        count /= 2;
        std::swap(in_base, out_base);
    }
    const int ordered = in_base + 1;
    g.vpermd(Zmm(ordered), perm, Zmm(in_base));
    return ordered;
}

} // namespace qsp::jit
