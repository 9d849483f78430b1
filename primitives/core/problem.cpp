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

static_assert(aggregate_member_count<problem>() == 12 && aggregate_member_count<conv2d_shape>() == 8
                      && aggregate_member_count<conv2d_geometry>() == 11,
              "a member was added to problem, conv2d_shape or conv2d_geometry: list it in "
              "problem::fields() (compare, hash, persistent key and description read that list), "
              "raise persistent_format_version, then update these counts");
// problem's members less the pattern and the nested conv2d_shape, plus
// conv2d_shape's less its geometry, plus the geometry's.
static_assert(problem::field_count == (12 - 2) + (8 - 1) + 11);

std::array<problem_field, problem::field_count> problem::fields() const {
    constexpr auto any = field_scope::any, lin = field_scope::linear, cnv = field_scope::conv2d;
    const conv2d_geometry &g = conv.g;
    return {{
            {nullptr, any, int64_t(op)},
            {nullptr, any, int64_t(dir)},
            {nullptr, any, int64_t(prop)},
            {nullptr, any, int64_t(scheme)},
            {"mb", lin, batch},
            {"ic", lin, in},
            {"oc", lin, out},
            {"mb", cnv, conv.batch},
            {"_ic", cnv, conv.in_c},
            {"ih", cnv, conv.in_h},
            {"iw", cnv, conv.in_w},
            {"_oc", cnv, conv.out_c},
            {"oh", cnv, conv.out_h},
            {"ow", cnv, conv.out_w},
            {"_kh", cnv, g.kernel_h},
            {"kw", cnv, g.kernel_w},
            {"sh", cnv, g.stride_h},
            {"sw", cnv, g.stride_w},
            {"pt", cnv, g.pad_top},
            {"pl", cnv, g.pad_left},
            {"pb", cnv, g.pad_bottom},
            {"pr", cnv, g.pad_right},
            {"dh", cnv, g.dilation_h},
            {"dw", cnv, g.dilation_w},
            {"g", cnv, g.groups},
            {nullptr, any, int64_t(with_bias)},
            {nullptr, any, int64_t(num_threads)},
            {nullptr, cnv, int64_t(vectorization)}, // described by name
    }};
}

int64_t problem::src_elems() const {
    return op == op_kind::linear ? batch * in : conv.batch * conv.in_c * conv.in_h * conv.in_w;
}

int64_t problem::dst_elems() const {
    return op == op_kind::linear ? batch * out : conv.batch * conv.out_c * conv.out_h * conv.out_w;
}

std::string problem::shape_str() const {
    const field_scope mine = op == op_kind::linear ? field_scope::linear : field_scope::conv2d;
    std::ostringstream s;
    for (const problem_field &f : fields())
        if (f.label && f.scope == mine) s << f.label << f.value;
    if (op == op_kind::conv2d && vectorization != conv_vectorization::any)
        s << ",vectorization=" << to_string(vectorization);
    s << ",density=" << pattern.density() << ",nnz=" << pattern.nnz();
    return s.str();
}

std::string problem::key_bytes() const {
    std::string b;
    auto put = [&b](int64_t v) { b.append(reinterpret_cast<const char *>(&v), sizeof v); };
    for (const problem_field &f : fields())
        put(f.value);
    for (int64_t v : {pattern.rows(), pattern.cols(), pattern.nnz()})
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
    const auto mine = fields(), theirs = o.fields();
    for (size_t i = 0; i < field_count; ++i)
        if (mine[i].value != theirs[i].value) return false;
    return pattern == o.pattern;
}

size_t problem_hash::operator()(const problem &p, uint64_t extra) const {
    using runtime::hash_mix;
    uint64_t h = hash_mix(p.pattern.hash(), extra);
    for (const problem_field &f : p.fields())
        h = hash_mix(h, static_cast<uint64_t>(f.value));
    return static_cast<size_t>(h);
}

} // namespace detail

} // namespace qsp
