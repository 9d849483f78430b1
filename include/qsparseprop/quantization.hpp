// The int8 ("s8") training scheme, stated once so that every implementation
// (reference, JIT, quantized-dense, the Python prototype) computes the same
// integers. See docs/quantization.md for the derivation and error bounds.
//
//   weights    Wq[n,j] = clamp(rne(W[n,j] / sw[n]), -127, 127),
//              sw[n] = max_j |W[n,j]| / 127   (per output channel)
//   activations Xq = clamp(rne(X / sx)), sx = max |X| / 127 (per tensor: one
//              scale serves the forward reduction over k *and* the
//              backward-weights reduction over the batch)
//   grads for dW  G1 = clamp(sr(dY / sg1)), sg1 = max |dY| / 127
//   grads for dX  G2 = clamp(sr(dY[.,n] * sw[n] / sg2)), sg2 = max |dY*sw| / 127
//              (the weight's per-channel scale is folded into the gradient,
//              so the backward-data reduction over n is a pure integer sum)
//   forward     Y[b,n]  = float(sum_k Xq Wq) * (sx * sw[n]) + bias[n]
//   bwd-data    dX[b,k] = float(sum_n G2 Wq) * sg2
//   bwd-weights dW[n,k] = float(sum_b G1 Xq) * (sg1 * sx)   (only at nonzeros)
//   bwd-bias    db[n]   = sum_b dY[b,n] in fp32 (cheap, exact enough)
//
// rne = round half to even; sr = stochastic rounding in 16-bit fixed point
// (stochastic_round): t = v clamped to [-127, 127], then
// floor((rne(t * 2^16) + u) / 2^16) with u a 16-bit integer from
// stochastic_rounding_noise(stream key, flat index): counter based, so the
// result does not depend on the thread count or the order of work, and
// E[sr(v)] = rne(t * 2^16) / 2^16, t within 2^-17. A scale of 0
// (all-zero tensor) quantizes to zeros. Sums are exact integers: an int32
// accumulator is only valid for int32_safe_reduction_length terms
// (127 * 255 * L < 2^31 also covers a u8-shifted VNNI operand); longer
// reductions are split into such pieces and the pieces added in int64.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace qsp {

constexpr int quant_max = 127;
constexpr int64_t int32_safe_reduction_length = 65536;

// The scale of a tensor (or row) from its max |value|: amax / 127, NaN when
// amax is not finite; `inv` is what values are multiplied by (0 when the
// scale is 0 or NaN: everything quantizes to 0 and the result carries the
// NaN scale). A scale so small that its inverse overflows (amax below
// ~3.7e-37: subnormal scales) is not usable either: x * inf would turn the
// zeros of the tensor into NaN; those values quantize to 0 (their products
// are far below float resolution of any nonzero result).
struct quant_scale {
    float scale, inv;
    bool usable;
};

inline quant_scale quant_scale_from_abs_max(float amax) {
    quant_scale s;
    s.scale = std::isfinite(amax) ? amax / static_cast<float>(quant_max)
                                  : std::numeric_limits<float>::quiet_NaN();
    s.usable = std::isfinite(s.scale) && s.scale > 0.f && std::isfinite(1.f / s.scale);
    s.inv = s.usable ? 1.f / s.scale : 0.f;
    return s;
}

inline uint32_t mix32(uint32_t x) {
    // "lowbias32" integer hash: full avalanche, cheap in SIMD and in torch.
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

inline uint32_t rounding_seed32(uint64_t seed) {
    return mix32(static_cast<uint32_t>(seed)
                 ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x9e3779b9u));
}

// The noise of element `index` in the rounding stream `key`: half of one
// hash of (index, key without bit 0), the high 16 bits when the key's bit 0
// is set, the low 16 when not. The two copies of dY (G1, G2) take keys that
// differ in bit 0 only (s8_protocol.hpp), so one hash per element serves
// both roundings, which stay independent (disjoint bits of a full-avalanche
// hash): half the hashing of two streams, the most expensive part of a
// gradient's quantization.
inline uint32_t stochastic_rounding_hash(uint32_t key, uint64_t index) {
    return mix32(static_cast<uint32_t>(index) ^ (key & ~1u));
}
inline int32_t stochastic_rounding_half(uint32_t key, uint32_t hash) {
    return static_cast<int32_t>((key & 1u) ? hash >> 16 : hash & 0xffffu);
}
inline int32_t stochastic_rounding_noise(uint32_t key, uint64_t index) {
    return stochastic_rounding_half(key, stochastic_rounding_hash(key, index));
}

static_assert((-1 >> 1) == -1, "stochastic_round needs an arithmetic right shift");

// sr of t = v / scale (v * inv) with a 16-bit noise: the clamp first (a NaN
// t, which a usable scale never meets, becomes -127, as the vector tiers'
// max(t, -127)), then the fixed-point floor. Every |q| <= 127 without a
// clamp after: rne(127 * 2^16) + 65535 < 128 * 2^16.
inline int8_t stochastic_round(float t, int32_t noise) {
    constexpr float lim = static_cast<float>(quant_max);
    t = t > -lim ? t : -lim;
    t = t < lim ? t : lim;
    const auto fixed = static_cast<int32_t>(std::nearbyint(t * 65536.f));
    return static_cast<int8_t>((fixed + noise) >> 16);
}

} // namespace qsp
