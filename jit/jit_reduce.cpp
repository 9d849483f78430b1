#include "jit/jit_reduce.hpp"

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

using lanes8 = std::array<int, 8>;

lanes8 lanes_perm2x128(const lanes8 &a, const lanes8 &b, int imm) {
    lanes8 r{};
    for (int h = 0; h < 2; ++h) {
        const int sel = (imm >> (4 * h)) & 3;
        for (int e = 0; e < 4; ++e)
            r[h * 4 + e] = (sel < 2 ? a : b)[(sel & 1) * 4 + e];
    }
    return r;
}

lanes8 lanes_shufps8(const lanes8 &a, const lanes8 &b, int imm) {
    lanes8 r{};
    for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 4; ++e)
            r[h * 4 + e] = (e < 2 ? a : b)[h * 4 + ((imm >> (2 * e)) & 3)];
    return r;
}

lanes8 lanes_add8(const lanes8 &x, const lanes8 &y) {
    if (x != y) throw std::logic_error("reduce8: the tree mixes different inputs");
    return x;
}

std::array<int32_t, 8> simulate8() {
    std::array<lanes8, 8> v{};
    for (int j = 0; j < 8; ++j)
        v[j].fill(j);
    for (int j = 0; j < 4; ++j)
        v[j] = lanes_add8(lanes_perm2x128(v[2 * j], v[2 * j + 1], 0x20),
                          lanes_perm2x128(v[2 * j], v[2 * j + 1], 0x31));
    for (int j = 0; j < 2; ++j)
        v[j] = lanes_add8(lanes_shufps8(v[2 * j], v[2 * j + 1], 0x44),
                          lanes_shufps8(v[2 * j], v[2 * j + 1], 0xEE));
    v[0] = lanes_add8(lanes_shufps8(v[0], v[1], 0x88), lanes_shufps8(v[0], v[1], 0xDD));
    std::array<int32_t, 8> lane_of{};
    for (int lane = 0; lane < 8; ++lane)
        lane_of[v[0][lane]] = lane;
    return lane_of;
}

} // namespace

const std::array<int32_t, 8> &reduce8_lane_of() {
    static const std::array<int32_t, 8> lane_of = simulate8();
    return lane_of;
}

void emit_reduce8(Xbyak::CodeGenerator &g, reduce_kind kind, const Xbyak::Ymm &tmp_a,
                  const Xbyak::Ymm &tmp_b) {
    using Xbyak::Ymm;
    auto add = [&](const Ymm &d) {
        if (kind == reduce_kind::f32)
            g.vaddps(d, tmp_a, tmp_b);
        else
            g.vpaddd(d, tmp_a, tmp_b);
    };
    for (int j = 0; j < 4; ++j) { // vperm2f128 moves integer lanes bit for bit too
        g.vperm2f128(tmp_a, Ymm(2 * j), Ymm(2 * j + 1), 0x20);
        g.vperm2f128(tmp_b, Ymm(2 * j), Ymm(2 * j + 1), 0x31);
        add(Ymm(j));
    }
    for (int j = 0; j < 2; ++j) {
        g.vshufps(tmp_a, Ymm(2 * j), Ymm(2 * j + 1), 0x44);
        g.vshufps(tmp_b, Ymm(2 * j), Ymm(2 * j + 1), 0xEE);
        add(Ymm(j));
    }
    g.vshufps(tmp_a, Ymm(0), Ymm(1), 0x88);
    g.vshufps(tmp_b, Ymm(0), Ymm(1), 0xDD);
    add(Ymm(0));
}

const std::array<int32_t, 16> &reduce16_lane_of() {
    static const std::array<int32_t, 16> lane_of = simulate();
    return lane_of;
}

int emit_reduce16(Xbyak::CodeGenerator &g, reduce_kind kind, const Xbyak::Zmm &perm) {
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
            if (kind == reduce_kind::f32)
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
