// sparse_linear_{forward, backward_data, backward_weights}: descriptor
// validation. Every refusal names the argument and the rule.
#include <sstream>

#include "primitives/core/pd_impl.hpp"

namespace qsp {

using namespace detail;

namespace {

// Batch size from a desc of `features` per example, plain 2-D (batch x
// features) or in the kept layout (kept_layout_desc: batch x features x 1).
int64_t batch_of(const char *prim, const char *arg, const dnnl::memory::desc &md, int64_t features,
                 const char *what) {
    const int nd = md.is_zero() ? 0 : md.get_ndims();
    if (nd != 2 && nd != 3)
        refuse(prim, std::string(arg) + " must be 2-D (batch x " + what + " = ? x "
                             + std::to_string(features)
                             + ") or the kept layout (kept_layout_desc), got dims "
                             + (md.is_zero() ? std::string("none") : dims_str(md.get_dims())));
    const int64_t batch = md.get_dims()[0];
    if (batch < 1)
        refuse(prim, std::string(arg) + " batch must be >= 1, got " + std::to_string(batch));
    if (md.get_dims()[1] != features)
        refuse(prim, std::string(arg) + " has " + std::to_string(md.get_dims()[1]) + " " + what
                             + " but the weights pattern has " + std::to_string(features)
                             + " (weights are out_features x in_features)");
    return batch;
}

// Checks a batch x features argument; true when it is in the kept layout.
bool check_activation(const char *prim, const char *arg, const dnnl::memory::desc &md,
                      int64_t batch, int64_t features, const char *meaning) {
    if (md.get_ndims() == 3) {
        if (md != kept_layout_desc(batch, features))
            refuse(prim, std::string(arg) + " is 3-D but not the kept layout: pass "
                                 + "kept_layout_desc(" + std::to_string(batch) + ", "
                                 + std::to_string(features) + ") (f32, Acb64a over dims "
                                 + dims_str({batch, features, 1}) + "), or a plain 2-D desc");
        return true;
    }
    check_plain_f32(prim, arg, md, {batch, features}, meaning);
    return false;
}

std::shared_ptr<pd_impl> make_linear_pd(const char *prim, direction dir, prop_kind prop,
                                        quant_scheme scheme, const dnnl::memory::desc &src_md,
                                        const csr_pattern &w, const dnnl::memory::desc &bias_md,
                                        const dnnl::memory::desc &dst_md, int num_threads) {
    auto pd = std::make_shared<pd_impl>();
    pd->primitive_name = prim;
    problem &p = pd->prob;
    p.op = op_kind::linear;
    p.dir = dir;
    p.prop = prop;
    p.scheme = scheme;
    p.pattern = w;
    p.in = w.cols();
    p.out = w.rows();
    const char *src_name = dir == direction::backward_data ? "diff_src_desc" : "src_desc";
    const char *dst_name = dir == direction::forward ? "dst_desc" : "diff_dst_desc";
    p.batch = batch_of(prim, src_name, src_md, p.in, "in_features");
    pd->src_kept = check_activation(prim, src_name, src_md, p.batch, p.in, "batch x in_features");
    if (!dst_md.is_zero() && dst_md.get_ndims() == 3 && dst_md.get_dims()[0] != p.batch)
        refuse(prim, std::string(dst_name) + " has batch " + std::to_string(dst_md.get_dims()[0])
                             + " but " + src_name + " has " + std::to_string(p.batch));
    pd->dst_kept = check_activation(prim, dst_name, dst_md, p.batch, p.out, "batch x out_features");
    p.with_bias = !bias_md.is_zero();
    if (p.with_bias)
        check_plain_f32(prim, dir == direction::forward ? "bias_desc" : "diff_bias_desc", bias_md,
                        {p.out}, "out_features");
    p.num_threads = num_threads;
    pd->src_md = pd->src_kept ? kept_layout_desc(p.batch, p.in) : plain_f32_desc({p.batch, p.in});
    pd->dst_md = pd->dst_kept ? kept_layout_desc(p.batch, p.out) : plain_f32_desc({p.batch, p.out});
    if (p.with_bias) pd->bias_md = plain_f32_desc({p.out});
    return pd;
}

// The team size, after refusing what only Conv2d accepts.
int linear_threads(const primitive_attr &attr, const char *name, int fallback = 0) {
    if (attr.vectorization != conv_vectorization::any)
        refuse(name, std::string("attr.vectorization applies to Conv2d only; got ")
                             + to_string(attr.vectorization) + " (leave it at any)");
    return resolve_num_threads(attr, name, fallback);
}

} // namespace

sparse_linear_forward::primitive_desc::primitive_desc(
        const dnnl::engine &engine, prop_kind prop, const dnnl::memory::desc &src_desc,
        const csr_pattern &weights, const dnnl::memory::desc &bias_desc,
        const dnnl::memory::desc &dst_desc, quant_scheme scheme, const primitive_attr &attr) {
    const char *name = "sparse_linear_forward";
    impl_ = make_linear_pd(name, direction::forward, prop, scheme, src_desc, weights, bias_desc,
                           dst_desc, linear_threads(attr, name));
    finish_pd(*impl_, engine, attr);
}

sparse_linear_forward::primitive_desc::primitive_desc(const dnnl::engine &engine, prop_kind prop,
                                                      const dnnl::memory::desc &src_desc,
                                                      const csr_pattern &weights,
                                                      const dnnl::memory::desc &dst_desc,
                                                      quant_scheme scheme,
                                                      const primitive_attr &attr)
    : primitive_desc(engine, prop, src_desc, weights, dnnl::memory::desc(), dst_desc, scheme,
                     attr) {}

dnnl::memory::desc sparse_linear_forward::primitive_desc::src_desc() const {
    return impl_->src_md;
}
dnnl::memory::desc sparse_linear_forward::primitive_desc::dst_desc() const {
    return impl_->dst_md;
}
dnnl::memory::desc sparse_linear_forward::primitive_desc::bias_desc() const {
    return impl_->bias_md;
}

sparse_linear_forward::sparse_linear_forward(const primitive_desc &pd) {
    init(pd);
}

sparse_linear_backward_data::primitive_desc::primitive_desc(
        const dnnl::engine &engine, const dnnl::memory::desc &diff_src_desc,
        const csr_pattern &weights, const dnnl::memory::desc &diff_dst_desc,
        const sparse_linear_forward::primitive_desc &hint, const primitive_attr &attr) {
    const char *name = "sparse_linear_backward_data";
    check_hint(name, *hint.impl(), weights);
    impl_ = make_linear_pd(name, direction::backward_data, hint.prop(), hint.scheme(),
                           diff_src_desc, weights, dnnl::memory::desc(), diff_dst_desc,
                           linear_threads(attr, name, hint.num_threads()));
    finish_pd(*impl_, engine, attr);
}

sparse_linear_backward_data::sparse_linear_backward_data(const primitive_desc &pd) {
    init(pd);
}

sparse_linear_backward_weights::primitive_desc::primitive_desc(
        const dnnl::engine &engine, const dnnl::memory::desc &src_desc, const csr_pattern &weights,
        const dnnl::memory::desc &diff_bias_desc, const dnnl::memory::desc &diff_dst_desc,
        const sparse_linear_forward::primitive_desc &hint, const primitive_attr &attr) {
    const char *name = "sparse_linear_backward_weights";
    check_hint(name, *hint.impl(), weights);
    impl_ = make_linear_pd(name, direction::backward_weights, hint.prop(), hint.scheme(), src_desc,
                           weights, diff_bias_desc, diff_dst_desc,
                           linear_threads(attr, name, hint.num_threads()));
    finish_pd(*impl_, engine, attr);
}

sparse_linear_backward_weights::sparse_linear_backward_weights(const primitive_desc &pd) {
    init(pd);
}

} // namespace qsp
