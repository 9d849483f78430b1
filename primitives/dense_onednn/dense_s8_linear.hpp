#pragma once

#include "primitives/core/implementation.hpp"

namespace qsp::detail {

// "dense:onednn_s8": the s8 scheme for Linear on oneDNN's int8 matmul.
implementation dense_onednn_s8_linear_implementation();

} // namespace qsp::detail
