// Xq and sx of an s8 forward's src (s8_protocol.hpp) for every s8 Conv2d
// implementation: rounded from the f32 src here, or given already rounded by
// src's writer (QSP_ARG_SRC_S8: a BatchNorm that never writes its f32
// output), the same integers either way.
#pragma once

#include <algorithm>
#include <cstring>

#include "primitives/core/implementation.hpp"
#include "primitives/passes/quantize.hpp"

namespace qsp::detail::s8 {

// Xq into xq (n elements), returning sx. A given Xq already at xq (the
// caller wrote it into the workspace) is used in place; elsewhere it is
// copied.
inline float quantized_src(const tensors &t, int64_t n, int8_t *xq, int num_threads,
                           quantize_rne_fn *quantize = quantize_rne) {
    if (!t.src_s8) return quantize(t.src, n, xq, t.src_abs_max, num_threads);
    if (t.src_s8 != xq) {
        constexpr int64_t block = 1 << 16;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t b = 0; b < n; b += block)
            std::memcpy(xq + b, t.src_s8 + b, static_cast<size_t>(std::min(block, n - b)));
    }
    return t.src_s8_scale;
}

} // namespace qsp::detail::s8
