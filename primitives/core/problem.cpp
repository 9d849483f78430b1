#include "primitives/core/problem.hpp"

#include <sstream>
#include <stdexcept>

#include "runtime/lru_cache.hpp"

namespace qsp {

const char *to_string(quant_scheme s) {
    return s == quant_scheme::s8 ? "s8" : "f32";
}

const char *to_string(conv_vectorization v) {
    switch (v) {
        case conv_vectorization::any:
            return "any";
        case conv_vectorization::batch:
            return "batch";
        case conv_vectorization::output_width:
            return "output_width";
    }
    return "invalid";
}

void check_conv2d_geometry(const conv2d_geometry &g, int64_t in_channels, int64_t out_channels) {
    auto at_least = [](int64_t v, int64_t lo, const char *name, const char *note) {
        if (v < lo)
            throw std::invalid_argument(std::string("conv2d geometry: ") + name + " must be >= "
                                        + std::to_string(lo) + note + ", got " + std::to_string(v));
    };
    at_least(g.kernel_h, 1, "kernel_h", "");
    at_least(g.kernel_w, 1, "kernel_w", "");
    at_least(g.stride_h, 1, "stride_h", "");
    at_least(g.stride_w, 1, "stride_w", "");
    at_least(g.pad_top, 0, "pad_top", "");
    at_least(g.pad_left, 0, "pad_left", "");
    at_least(g.pad_bottom, 0, "pad_bottom", "");
    at_least(g.pad_right, 0, "pad_right", "");
    at_least(g.dilation_h, 1, "dilation_h", " (1 = no dilation, torch's convention)");
    at_least(g.dilation_w, 1, "dilation_w", " (1 = no dilation, torch's convention)");
    at_least(g.groups, 1, "groups", "");
    // Bounds that keep every size computed from the geometry in int64.
    constexpr int64_t limit = int64_t(1) << 31;
    auto at_most = [&](int64_t v, const char *name) {
        if (v > limit)
            throw std::invalid_argument(std::string("conv2d geometry: ") + name
                                        + " must be <= 2^31, got " + std::to_string(v));
    };
    for (auto [v, name] : {std::pair<int64_t, const char *>{g.kernel_h, "kernel_h"},
                           {g.kernel_w, "kernel_w"},
                           {g.stride_h, "stride_h"},
                           {g.stride_w, "stride_w"},
                           {g.pad_top, "pad_top"},
                           {g.pad_left, "pad_left"},
                           {g.pad_bottom, "pad_bottom"},
                           {g.pad_right, "pad_right"},
                           {g.dilation_h, "dilation_h"},
                           {g.dilation_w, "dilation_w"},
                           {g.groups, "groups"}})
        at_most(v, name);
    if (in_channels > 0 && in_channels % g.groups != 0)
        throw std::invalid_argument("conv2d geometry: in_channels (" + std::to_string(in_channels)
                                    + ") must be divisible by groups (" + std::to_string(g.groups)
                                    + ")");
    if (out_channels > 0 && out_channels % g.groups != 0)
        throw std::invalid_argument("conv2d geometry: out_channels (" + std::to_string(out_channels)
                                    + ") must be divisible by groups (" + std::to_string(g.groups)
                                    + ")");
}

std::array<int64_t, 2> conv2d_output_hw(const conv2d_geometry &g, int64_t in_h, int64_t in_w) {
    check_conv2d_geometry(g);
    constexpr int64_t limit = int64_t(1) << 31;
    if (in_h < 1 || in_w < 1 || in_h > limit || in_w > limit)
        throw std::invalid_argument("conv2d: input height and width must be in [1, 2^31], got "
                                    + std::to_string(in_h) + "x" + std::to_string(in_w));
    const int64_t span_h = g.dilation_h * (g.kernel_h - 1) + 1,
                  span_w = g.dilation_w * (g.kernel_w - 1) + 1;
    const int64_t padded_h = in_h + g.pad_top + g.pad_bottom,
                  padded_w = in_w + g.pad_left + g.pad_right;
    if (padded_h < span_h || padded_w < span_w)
        throw std::invalid_argument("conv2d: input " + std::to_string(in_h) + "x"
                                    + std::to_string(in_w) + " (padded " + std::to_string(padded_h)
                                    + "x" + std::to_string(padded_w)
                                    + ") is smaller than the dilated kernel "
                                    + std::to_string(span_h) + "x" + std::to_string(span_w));
    return {(padded_h - span_h) / g.stride_h + 1, (padded_w - span_w) / g.stride_w + 1};
}

namespace detail {

const char *to_string(direction d) {
    switch (d) {
        case direction::forward:
            return "forward";
        case direction::backward_data:
            return "backward_data";
        case direction::backward_weights:
            return "backward_weights";
    }
    return "?";
}

bool conv2d_shape::operator==(const conv2d_shape &o) const {
    return batch == o.batch && in_c == o.in_c && in_h == o.in_h && in_w == o.in_w
           && out_c == o.out_c && out_h == o.out_h && out_w == o.out_w && g.kernel_h == o.g.kernel_h
           && g.kernel_w == o.g.kernel_w && g.stride_h == o.g.stride_h && g.stride_w == o.g.stride_w
           && g.pad_top == o.g.pad_top && g.pad_left == o.g.pad_left
           && g.pad_bottom == o.g.pad_bottom && g.pad_right == o.g.pad_right
           && g.dilation_h == o.g.dilation_h && g.dilation_w == o.g.dilation_w
           && g.groups == o.g.groups;
}

int64_t problem::src_elems() const {
    return op == op_kind::linear ? batch * in : conv.batch * conv.in_c * conv.in_h * conv.in_w;
}

int64_t problem::dst_elems() const {
    return op == op_kind::linear ? batch * out : conv.batch * conv.out_c * conv.out_h * conv.out_w;
}

std::string problem::shape_str() const {
    std::ostringstream s;
    if (op == op_kind::linear) {
        s << "mb" << batch << "ic" << in << "oc" << out;
    } else {
        const auto &g = conv.g;
        s << "mb" << conv.batch << "_ic" << conv.in_c << "ih" << conv.in_h << "iw" << conv.in_w
          << "_oc" << conv.out_c << "oh" << conv.out_h << "ow" << conv.out_w << "_kh" << g.kernel_h
          << "kw" << g.kernel_w << "sh" << g.stride_h << "sw" << g.stride_w << "ph" << g.pad_top
          << "_" << g.pad_bottom << "pw" << g.pad_left << "_" << g.pad_right << "dh" << g.dilation_h
          << "dw" << g.dilation_w << "g" << g.groups;
        if (vectorization != conv_vectorization::any)
            s << ",vectorization=" << to_string(vectorization);
    }
    s << ",density=" << pattern.density() << ",nnz=" << pattern.nnz();
    return s.str();
}

std::string problem::key_bytes() const {
    std::string b;
    auto put = [&b](int64_t v) { b.append(reinterpret_cast<const char *>(&v), sizeof v); };
    for (int64_t v : {int64_t(op),
                      int64_t(dir),
                      int64_t(prop),
                      int64_t(scheme),
                      batch,
                      in,
                      out,
                      conv.batch,
                      conv.in_c,
                      conv.in_h,
                      conv.in_w,
                      conv.out_c,
                      conv.out_h,
                      conv.out_w,
                      conv.g.kernel_h,
                      conv.g.kernel_w,
                      conv.g.stride_h,
                      conv.g.stride_w,
                      conv.g.pad_top,
                      conv.g.pad_left,
                      conv.g.pad_bottom,
                      conv.g.pad_right,
                      conv.g.dilation_h,
                      conv.g.dilation_w,
                      conv.g.groups,
                      int64_t(with_bias),
                      int64_t(num_threads),
                      int64_t(vectorization),
                      pattern.rows(),
                      pattern.cols(),
                      pattern.nnz()})
        put(v);
    b.append(reinterpret_cast<const char *>(pattern.row_ptr()),
             sizeof(int64_t) * static_cast<size_t>(pattern.rows() + 1));
    b.append(reinterpret_cast<const char *>(pattern.col_idx()),
             sizeof(int32_t) * static_cast<size_t>(pattern.nnz()));
    return b;
}

problem problem::without_batch() const {
    problem p = *this;
    p.batch = 0;
    p.conv.batch = 0;
    return p;
}

bool problem::operator==(const problem &o) const {
    return op == o.op && dir == o.dir && prop == o.prop && scheme == o.scheme && batch == o.batch
           && in == o.in && out == o.out && conv == o.conv && with_bias == o.with_bias
           && num_threads == o.num_threads && vectorization == o.vectorization
           && pattern == o.pattern;
}

size_t problem_hash::operator()(const problem &p) const {
    using runtime::hash_mix;
    uint64_t h = p.pattern.hash();
    for (int64_t v : {int64_t(p.op),
                      int64_t(p.dir),
                      int64_t(p.prop),
                      int64_t(p.scheme),
                      p.batch,
                      p.in,
                      p.out,
                      p.conv.batch,
                      p.conv.in_c,
                      p.conv.in_h,
                      p.conv.in_w,
                      p.conv.out_c,
                      p.conv.g.kernel_h,
                      p.conv.g.kernel_w,
                      p.conv.g.stride_h,
                      p.conv.g.stride_w,
                      p.conv.g.groups,
                      int64_t(p.with_bias),
                      int64_t(p.num_threads),
                      int64_t(p.vectorization)})
        h = hash_mix(h, static_cast<uint64_t>(v));
    return static_cast<size_t>(h);
}

} // namespace detail

} // namespace qsp
