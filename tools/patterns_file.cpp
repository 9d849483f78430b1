#include "tools/patterns_file.hpp"

#include <array>
#include <cstring>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace qsp::tools {

namespace {
using json = nlohmann::json;
} // namespace

std::string base64_decode(const std::string &in, const std::string &what) {
    auto value = [](char c) -> int {
        if (c >= 'A' && c <= 'Z') return c - 'A';
        if (c >= 'a' && c <= 'z') return c - 'a' + 26;
        if (c >= '0' && c <= '9') return c - '0' + 52;
        if (c == '+') return 62;
        if (c == '/') return 63;
        return -1;
    };
    if (in.size() % 4 != 0)
        throw std::invalid_argument(what + ": base64 length not a multiple of 4");
    std::string out;
    out.reserve(in.size() / 4 * 3);
    for (size_t i = 0; i < in.size(); i += 4) {
        int v[4];
        int pad = 0;
        for (int k = 0; k < 4; ++k) {
            const char c = in[i + k];
            if (c == '=' && i + 4 == in.size() && k >= 2) {
                v[k] = 0;
                ++pad;
                continue;
            }
            if (pad || (v[k] = value(c)) < 0) throw std::invalid_argument(what + ": not base64");
        }
        const uint32_t n = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
        out.push_back(static_cast<char>((n >> 16) & 0xff));
        if (pad < 2) out.push_back(static_cast<char>((n >> 8) & 0xff));
        if (pad < 1) out.push_back(static_cast<char>(n & 0xff));
    }
    return out;
}

namespace {

// Sizes beyond these are not a layer of ours; checking first keeps every
// product below in range.
constexpr int64_t max_dim = (int64_t(1) << 31) - 1;
constexpr int64_t max_tensor_elements = int64_t(1) << 31;

template <typename T>
std::vector<T> le_array(const std::string &bytes, int64_t count, const std::string &what) {
    if (count < 0 || count > max_dim + 1 || bytes.size() != static_cast<size_t>(count) * sizeof(T))
        throw std::invalid_argument(what + ": " + std::to_string(bytes.size()) + " bytes, expected "
                                    + std::to_string(count) + " entries of "
                                    + std::to_string(sizeof(T)));
    std::vector<T> out(static_cast<size_t>(count));
    std::memcpy(out.data(), bytes.data(), bytes.size()); // x86: little endian, as written
    return out;
}

// An integer of JSON (not a float, not beyond int64) in [lo, max_dim].
int64_t integer(const json &v, const std::string &what, int64_t lo) {
    if (!v.is_number_integer()) throw std::invalid_argument(what + " must be an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(max_dim))
        throw std::invalid_argument(what + " is too large");
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > max_dim)
        throw std::invalid_argument(what + " must be in [" + std::to_string(lo) + ", "
                                    + std::to_string(max_dim) + "], got " + std::to_string(x));
    return x;
}

int64_t positive(const json &v, const std::string &what) {
    return integer(v, what, 1);
}

std::array<int64_t, 2> pair_of(const json &v, const std::string &what) {
    if (!v.is_array() || v.size() != 2) throw std::invalid_argument(what + " must be a pair");
    return {integer(v[0], what, 0), integer(v[1], what, 0)};
}

patterns_layer parse_layer(const json &d) {
    patterns_layer l;
    l.name = d.at("name").get<std::string>();
    l.cls = d.at("cls").get<std::string>();
    if (l.cls == "SparseLinear" || l.cls == "QuantizedSparseLinear")
        l.conv = false;
    else if (l.cls == "SparseConv2d" || l.cls == "QuantizedSparseConv2d")
        l.conv = true;
    else
        throw std::invalid_argument("class '" + l.cls
                                    + "' is not a sparse Linear or Conv2d of qsparseprop");
    l.scheme = l.cls.rfind("Quantized", 0) == 0 ? quant_scheme::s8 : quant_scheme::f32;
    const json &c = d.at("config");
    l.bias = c.at("bias").get<bool>();
    for (const json &s : d.at("input_shape"))
        l.input_shape.push_back(positive(s, "input_shape"));
    int64_t cols = 0;
    if (!l.conv) {
        l.in = positive(c.at("in_features"), "in_features");
        l.out = positive(c.at("out_features"), "out_features");
        if (l.input_shape.size() < 2 || l.input_shape.back() != l.in)
            throw std::invalid_argument("input_shape must end in in_features");
        cols = l.in;
    } else {
        l.in = positive(c.at("in_channels"), "in_channels");
        l.out = positive(c.at("out_channels"), "out_channels");
        const auto k = pair_of(c.at("kernel_size"), "kernel_size"),
                   s = pair_of(c.at("stride"), "stride"),
                   dl = pair_of(c.at("dilation"), "dilation");
        l.g.kernel_h = k[0], l.g.kernel_w = k[1], l.g.stride_h = s[0], l.g.stride_w = s[1];
        l.g.dilation_h = dl[0], l.g.dilation_w = dl[1];
        l.g.groups = positive(c.at("groups"), "groups");
        const json &p = c.at("padding");
        if (p.is_string()) { // torch's 'valid' / 'same' (extra padding after, as torch)
            const std::string mode = p.get<std::string>();
            if (mode == "same") {
                const int64_t th = l.g.dilation_h * (l.g.kernel_h - 1),
                              tw = l.g.dilation_w * (l.g.kernel_w - 1);
                l.g.pad_top = th / 2, l.g.pad_bottom = th - th / 2, l.g.pad_left = tw / 2,
                l.g.pad_right = tw - tw / 2;
            } else if (mode != "valid") {
                throw std::invalid_argument("padding '" + mode
                                            + "' is not 'same', 'valid' or a pair");
            }
        } else {
            const auto pp = pair_of(p, "padding");
            l.g.pad_top = l.g.pad_bottom = pp[0], l.g.pad_left = l.g.pad_right = pp[1];
        }
        check_conv2d_geometry(l.g, l.in, l.out);
        if (l.input_shape.size() != 4 || l.input_shape[1] != l.in)
            throw std::invalid_argument("input_shape must be N x in_channels x H x W");
        const json &v = c.at("vectorizing_over_on");
        l.vectorization = v.is_null()     ? conv_vectorization::any
                          : v.get<bool>() ? conv_vectorization::output_width
                                          : conv_vectorization::batch;
        int64_t taps = 0;
        if (__builtin_mul_overflow(l.g.kernel_h, l.g.kernel_w, &taps)
            || __builtin_mul_overflow(l.in / l.g.groups, taps, &cols) || cols > max_dim)
            throw std::invalid_argument("in_channels / groups x kernel is too large");
    }
    // Every tensor the layer's shapes imply (input and output) must fit the
    // bound both readers share: 2^31 elements, 8 GiB of f32. Validation used
    // to pass a 10^7 x 512 input and warming it then asked for 20 GB.
    int64_t elems = 1;
    for (int64_t v : l.input_shape)
        if (__builtin_mul_overflow(elems, v, &elems) || elems > max_tensor_elements)
            throw std::invalid_argument("input_shape implies more than 2^31 elements");
    int64_t out_elems = 0;
    if (!l.conv) {
        if (__builtin_mul_overflow(elems / l.in, l.out, &out_elems))
            out_elems = max_tensor_elements + 1;
    } else {
        const auto hw = conv2d_output_hw(l.g, l.input_shape[2], l.input_shape[3]);
        int64_t pixels = 0, per_pixel = 0; // factors from a file: every product checked
        if (__builtin_mul_overflow(hw[0], hw[1], &pixels)
            || __builtin_mul_overflow(l.input_shape[0], l.out, &per_pixel)
            || __builtin_mul_overflow(per_pixel, pixels, &out_elems))
            out_elems = max_tensor_elements + 1;
    }
    if (out_elems > max_tensor_elements)
        throw std::invalid_argument("the output implies more than 2^31 elements");
    if (c.contains("fused_relu") && !c.at("fused_relu").is_boolean())
        throw std::invalid_argument("fused_relu must be true or false");
    const int64_t rows = integer(d.at("rows"), "rows", 1), nnz = integer(d.at("nnz"), "nnz", 0);
    if (rows != l.out) throw std::invalid_argument("rows must equal the output size");
    if (nnz < 0 || nnz > rows * cols) throw std::invalid_argument("nnz out of range");
    auto rp = le_array<int64_t>(base64_decode(d.at("row_ptr").get<std::string>(), "row_ptr"),
                                rows + 1, "row_ptr");
    auto ci = le_array<int32_t>(base64_decode(d.at("col_idx").get<std::string>(), "col_idx"), nnz,
                                "col_idx");
    l.pattern = csr_pattern::from_indices(rows, cols, std::move(rp), std::move(ci)); // validates
    return l;
}

} // namespace

std::vector<patterns_layer> parse_patterns(const std::string &text) {
    json data;
    try {
        data = json::parse(text);
    } catch (const json::exception &e) {
        throw std::invalid_argument(std::string("not a patterns file (") + e.what() + ")");
    }
    if (!data.is_object() || !data.contains("format") || !data["format"].is_number_integer()
        || data["format"].get<int64_t>() != 1 || !data.contains("layers")
        || !data["layers"].is_array())
        throw std::invalid_argument(
                "not a patterns file of format 1 (written by qsparseprop export-patterns)");
    std::vector<patterns_layer> layers;
    for (size_t i = 0; i < data["layers"].size(); ++i) {
        const json &d = data["layers"][i];
        try {
            if (!d.is_object()) throw std::invalid_argument("not an object");
            layers.push_back(parse_layer(d));
        } catch (const std::exception &e) { // json::exception, invalid_argument
            const std::string name = d.is_object() && d.contains("name") && d["name"].is_string()
                                             ? d["name"].get<std::string>()
                                             : "?";
            throw std::invalid_argument("layer " + std::to_string(i) + " (" + name
                                        + "): " + e.what());
        }
    }
    return layers;
}

} // namespace qsp::tools
