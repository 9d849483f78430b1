// sparse_conv2d_{forward, backward_data, backward_weights}: descriptor
// validation (geometry, groups, shapes). Every refusal names the rule.
#include <stdexcept>
#include <string>

#include "primitives/core/pd_impl.hpp"
#include "primitives/core/s8_protocol.hpp"

namespace qsp {

using namespace detail;

namespace {

std::shared_ptr<pd_impl> make_conv_pd(const char *prim, direction dir, prop_kind prop,
                                      quant_scheme scheme, const dnnl::memory::desc &src_md,
                                      const csr_pattern &w, const dnnl::memory::desc &bias_md,
                                      const dnnl::memory::desc &dst_md, const conv2d_geometry &g,
                                      int num_threads, conv_vectorization vectorization) {
    const char *src_name = dir == direction::backward_data ? "diff_src_desc" : "src_desc";
    const char *dst_name = dir == direction::forward ? "dst_desc" : "diff_dst_desc";
    if (src_md.is_zero() || src_md.get_ndims() != 4)
        refuse(prim,
               std::string(src_name) + " must be 4-D (N x C x H x W), got dims "
                       + (src_md.is_zero() ? std::string("none") : dims_str(src_md.get_dims())));
    const auto sd = src_md.get_dims();
    // Every geometry and size check before anything is computed from them.
    try {
        check_conv2d_geometry(g, sd[1], w.rows());
    } catch (const std::invalid_argument &e) {
        refuse(prim, e.what());
    }
    conv2d_shape s;
    s.batch = sd[0];
    s.in_c = sd[1];
    s.in_h = sd[2];
    s.in_w = sd[3];
    s.out_c = w.rows();
    s.g = g;
    if (s.batch < 1) refuse(prim, std::string(src_name) + " batch must be >= 1");
    if (s.in_c < 1) refuse(prim, std::string(src_name) + " must have >= 1 channel");
    const int64_t cols = s.in_c / g.groups * g.kernel_h * g.kernel_w;
    if (w.cols() != cols)
        refuse(prim, "weights pattern has " + std::to_string(w.cols())
                             + " columns but C/groups * KH * KW = " + std::to_string(cols)
                             + " (columns are (ic * KH + kh) * KW + kw)");
    try {
        const auto o = conv2d_output_hw(g, s.in_h, s.in_w);
        s.out_h = o[0];
        s.out_w = o[1];
    } catch (const std::invalid_argument &e) {
        refuse(prim, e.what());
    }
    check_plain_f32(prim, src_name, src_md, sd, "N x C x H x W");
    check_plain_f32(prim, dst_name, dst_md, {s.batch, s.out_c, s.out_h, s.out_w},
                    "N x OC x OH x OW");

    auto pd = std::make_shared<pd_impl>();
    pd->primitive_name = prim;
    pd->geometry = g;
    problem &p = pd->prob;
    p.op = op_kind::conv2d;
    p.dir = dir;
    p.prop = prop;
    p.scheme = scheme;
    p.pattern = w;
    p.conv = s;
    p.with_bias = !bias_md.is_zero();
    if (p.with_bias)
        check_plain_f32(prim, dir == direction::forward ? "bias_desc" : "diff_bias_desc", bias_md,
                        {s.out_c}, "out_channels");
    p.num_threads = num_threads;
    if (vectorization != conv_vectorization::any && vectorization != conv_vectorization::batch
        && vectorization != conv_vectorization::output_width)
        refuse(prim, "attr.vectorization must be any, batch or output_width, got "
                             + std::to_string(static_cast<int>(vectorization)));
    p.vectorization = vectorization;
    pd->src_md = plain_f32_desc(sd);
    pd->dst_md = plain_f32_desc({s.batch, s.out_c, s.out_h, s.out_w});
    if (p.with_bias) pd->bias_md = plain_f32_desc({s.out_c});
    return pd;
}

conv_vectorization backward_vectorization(const primitive_attr &attr, const pd_impl &hint) {
    return attr.vectorization != conv_vectorization::any ? attr.vectorization
                                                         : hint.prob.vectorization;
}

} // namespace

sparse_conv2d_forward::primitive_desc::primitive_desc(
        const dnnl::engine &engine, prop_kind prop, const dnnl::memory::desc &src_desc,
        const csr_pattern &weights, const dnnl::memory::desc &bias_desc,
        const dnnl::memory::desc &dst_desc, const conv2d_geometry &geometry, quant_scheme scheme,
        const primitive_attr &attr) {
    const char *name = "sparse_conv2d_forward";
    impl_ = make_conv_pd(name, direction::forward, prop, scheme, src_desc, weights, bias_desc,
                         dst_desc, geometry, resolve_num_threads(attr, name), attr.vectorization);
    finish_pd(*impl_, engine, attr);
}

dnnl::memory::desc sparse_conv2d_forward::primitive_desc::src_desc() const {
    return impl_->src_md;
}
dnnl::memory::desc sparse_conv2d_forward::primitive_desc::dst_desc() const {
    return impl_->dst_md;
}
const conv2d_geometry &sparse_conv2d_forward::primitive_desc::geometry() const {
    return impl_->geometry;
}
size_t sparse_conv2d_forward::primitive_desc::workspace_src_s8_offset() const {
    if (impl_->workspace_md.is_zero())
        refuse(impl_->primitive_name, "workspace_src_s8_offset: the descriptor has no workspace "
                                      "(only s8 forward_training keeps the quantized src)");
    return s8::workspace_layout(impl_->prob).src_q;
}

sparse_conv2d_forward::sparse_conv2d_forward(const primitive_desc &pd) {
    init(pd);
}

sparse_conv2d_backward_data::primitive_desc::primitive_desc(
        const dnnl::engine &engine, const dnnl::memory::desc &diff_src_desc,
        const csr_pattern &weights, const dnnl::memory::desc &diff_dst_desc,
        const sparse_conv2d_forward::primitive_desc &hint, const primitive_attr &attr) {
    const char *name = "sparse_conv2d_backward_data";
    check_hint(name, *hint.impl(), weights);
    impl_ = make_conv_pd(name, direction::backward_data, hint.prop(), hint.scheme(), diff_src_desc,
                         weights, dnnl::memory::desc(), diff_dst_desc, hint.geometry(),
                         resolve_num_threads(attr, name, hint.num_threads()),
                         backward_vectorization(attr, *hint.impl()));
    finish_pd(*impl_, engine, attr);
}

sparse_conv2d_backward_data::sparse_conv2d_backward_data(const primitive_desc &pd) {
    init(pd);
}

sparse_conv2d_backward_weights::primitive_desc::primitive_desc(
        const dnnl::engine &engine, const dnnl::memory::desc &src_desc, const csr_pattern &weights,
        const dnnl::memory::desc &diff_bias_desc, const dnnl::memory::desc &diff_dst_desc,
        const sparse_conv2d_forward::primitive_desc &hint, const primitive_attr &attr) {
    const char *name = "sparse_conv2d_backward_weights";
    check_hint(name, *hint.impl(), weights);
    impl_ = make_conv_pd(name, direction::backward_weights, hint.prop(), hint.scheme(), src_desc,
                         weights, diff_bias_desc, diff_dst_desc, hint.geometry(),
                         resolve_num_threads(attr, name, hint.num_threads()),
                         backward_vectorization(attr, *hint.impl()));
    finish_pd(*impl_, engine, attr);
}

sparse_conv2d_backward_weights::sparse_conv2d_backward_weights(const primitive_desc &pd) {
    init(pd);
}

} // namespace qsp
