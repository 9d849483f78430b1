#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// "dense:onednn_s8" for Conv2d: the s8 scheme's forward on oneDNN's int8
// convolution, backward-data on its int8 deconvolution.
implementation dense_onednn_s8_conv2d_implementation();

} // namespace qsp::detail
