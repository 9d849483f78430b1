// Patterns files (written by `qsparseprop export-patterns`): each sparse
// layer's class, configuration, input shape and CSR pattern. They come from
// outside, so parsing checks every field, decodes base64 strictly and builds
// the pattern with csr_pattern::from_indices (which validates it); any
// problem is std::invalid_argument naming the layer. Used by qsp-warmup and
// fuzzed by tests/fuzz.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qsparseprop/qsparseprop.hpp"

namespace qsp::tools {

struct patterns_layer {
    std::string name, cls;
    bool conv = false;
    quant_scheme scheme = quant_scheme::f32;
    int64_t in = 0, out = 0; // features or channels
    bool bias = false;
    conv2d_geometry g{};
    conv_vectorization vectorization = conv_vectorization::any;
    std::vector<int64_t> input_shape;
    csr_pattern pattern;
};

// The layers of a patterns file's text; std::invalid_argument if it is not
// one of format 1 or any layer is malformed ("layer <i> (<name>): why").
std::vector<patterns_layer> parse_patterns(const std::string &text);

// Strict base64 (RFC 4648, padded); std::invalid_argument otherwise.
std::string base64_decode(const std::string &in, const std::string &what);

} // namespace qsp::tools
