// The s8 training step, stated once for every s8 implementation (reference,
// sparse JIT, quantized-dense): what the forward saves for the backward,
// which rounding stream each backward direction draws from, and which scale
// multiplies which exact integer sum. The quantization rules themselves are
// in include/qsparseprop/quantization.hpp.
//
//   forward          Xq, sx = quantize_rne(X)      -> workspace (for backward-weights)
//                    Wq, sw = quantize_weights(W)   per output channel
//                                                   -> workspace (for backward-data)
//                    Y[b,n] = float(sum Xq Wq) * forward_scale(sx, sw[n]) + bias[n]
//   backward-data    G2, sg2 = quantize_stochastic(dY * sw[n], dx_stream(seed))
//                    dX = float(sum G2 Wq) * sg2
//                    (Wq and sw read back from the forward's workspace: the
//                    weights are quantized once per training step)
//   backward-weights G1, sg1 = quantize_stochastic(dY, dw_stream(seed))
//                    dW = float(sum G1 Xq) * backward_weights_scale(sg1, sx)
//                    (Xq and sx read back from the forward's workspace)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "jit/tile_abi.hpp"
#include "primitives/core/problem.hpp"
#include "qsparseprop/quantization.hpp"

namespace qsp::detail::s8 {

// Workspace: a header holding the activation scale and the form of Xq (64
// bytes keep Xq cache-line aligned), then Xq (one byte per src element: a
// quarter of saving the f32 src), then Wq (one byte per weight) and the
// weights' per-output-channel scales, each starting on a cache line. A
// Linear whose src is in the kept layout (kept_layout_desc) has room for Xq
// in that layout's tiles (its batch padded to 64), which the JIT's entry
// pairs write there: their kernels read those tiles, and so does
// backward-weights, so Xq is never packed a second time.
constexpr size_t workspace_header_bytes = 64;
enum class src_q_form : uint8_t {
    plain = 0, // batch x in (or the convolution's src shape)
    tiles = 1, // the kept layout's tiles, a byte an element
};
struct workspace_layout {
    size_t src_q = 0, weights_q = 0, weight_scale = 0, bytes = 0;
    workspace_layout() = default;
    workspace_layout(int64_t src_elems, int64_t nnz, int64_t channels) {
        auto line = [](size_t n) { return (n + 63) / 64 * 64; };
        src_q = workspace_header_bytes;
        weights_q = line(src_q + static_cast<size_t>(src_elems));
        weight_scale = line(weights_q + static_cast<size_t>(nnz));
        bytes = weight_scale + sizeof(float) * static_cast<size_t>(channels);
    }
    explicit workspace_layout(const problem &p, bool src_kept = false)
        : workspace_layout(src_kept ? jit::tiled_elems(p.batch, p.in) : p.src_elems(),
                           p.pattern.nnz(), p.channels()) {}
};
inline size_t workspace_bytes(const problem &p, bool src_kept = false) {
    return workspace_layout(p, src_kept).bytes;
}

// An execution's workspace, its parts located from the descriptor's problem
// (plans serve several batch sizes: theirs may not be this execution's).
struct workspace_view {
    uint8_t *base = nullptr;
    workspace_layout at;
    workspace_view() = default;
    workspace_view(uint8_t *workspace, const problem &p, bool src_kept = false)
        : base(workspace), at(p, src_kept) {}
    explicit operator bool() const { return base != nullptr; }

    float src_scale() const {
        float s;
        std::memcpy(&s, base, sizeof(float));
        return s;
    }
    // The forward's: the scale, and the form it wrote Xq in.
    void set_src_scale(float s, src_q_form form = src_q_form::plain) const {
        std::memcpy(base, &s, sizeof(float));
        base[sizeof(float)] = static_cast<uint8_t>(form);
    }
    src_q_form src_form() const {
        return base[sizeof(float)] == static_cast<uint8_t>(src_q_form::tiles) ? src_q_form::tiles
                                                                              : src_q_form::plain;
    }
    // Where the forward writes Xq (in either form).
    int8_t *src_q() const { return reinterpret_cast<int8_t *>(base + at.src_q); }
    // Xq for a backward that reads the plain form: a workspace whose
    // forward wrote tiles (the JIT's entry pairs with a kept src) is refused
    // by name rather than read as the wrong layout.
    const int8_t *plain_src_q() const {
        if (src_form() != src_q_form::plain)
            throw std::invalid_argument(
                    "s8 workspace: its forward wrote the quantized src in the kept layout's "
                    "tiles (a sparse JIT forward with src in kept_layout_desc), which this "
                    "backward implementation reads only in the plain layout; run the forward "
                    "with a plain src, or force the same JIT implementation for the backward");
        return src_q();
    }
    int8_t *weights_q() const { return reinterpret_cast<int8_t *>(base + at.weights_q); }
    float *weight_scale() const { return reinterpret_cast<float *>(base + at.weight_scale); }
};

// The rounding streams of the two quantized copies of dY: one key but bit
// 0, so each element's one hash gives both their noises (quantization.hpp).
inline uint32_t dw_stream(uint64_t seed) {
    return rounding_seed32(seed) & ~1u;
}
inline uint32_t dx_stream(uint64_t seed) {
    return rounding_seed32(seed) | 1u;
}

// The float scale of an exact integer sum, in the order every
// implementation applies it (so their results agree bit for bit).
inline float forward_scale(float src_scale, float weight_scale) {
    return src_scale * weight_scale;
}
inline float backward_weights_scale(float g1_scale, float src_scale) {
    return g1_scale * src_scale;
}

} // namespace qsp::detail::s8
