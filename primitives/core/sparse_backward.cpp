// The fused backward: two primitives run back to back with one shared
// output-gradient context.
#include "primitives/core/implementation.hpp"
#include "primitives/core/pd_impl.hpp"
#include "qsparseprop/primitives.hpp"

namespace qsp {

using namespace detail;

namespace {

// Refuses descriptors that do not describe one layer's two backward
// directions at the same shapes; returns the backward-data one.
template <typename data_pd_t, typename weights_pd_t>
const data_pd_t &checked_pair(const data_pd_t &data, const weights_pd_t &weights) {
    const pd_impl &d = *data.impl(), &w = *weights.impl();
    const char *name = "sparse_backward";
    if (d.prob.dir != direction::backward_data || w.prob.dir != direction::backward_weights)
        refuse(name, "takes a backward-data and a backward-weights descriptor");
    if (!(d.prob.pattern == w.prob.pattern))
        refuse(name, "the two descriptors have different weight patterns");
    if (d.prob.scheme != w.prob.scheme || d.prob.prop != w.prob.prop)
        refuse(name, "the two descriptors have different schemes or prop kinds");
    // The same shapes; diff_src and src may differ in layout (kept or plain).
    const auto shape = [](const dnnl::memory::desc &md) {
        auto dims = md.get_dims();
        if (md.get_ndims() == 3) dims.pop_back(); // kept_layout_desc: batch x features x 1
        return dims;
    };
    if (d.dst_md != w.dst_md || shape(d.src_md) != shape(w.src_md))
        refuse(name, "the two descriptors describe different shapes (diff_dst "
                             + dims_str(d.dst_md.get_dims()) + " vs "
                             + dims_str(w.dst_md.get_dims()) + ")");
    const auto d_fields = d.prob.fields(), w_fields = w.prob.fields();
    for (size_t i = 0; i < problem::field_count; ++i)
        if (d_fields[i].scope == field_scope::conv2d && d_fields[i].label // the shape's fields
            && d_fields[i].value != w_fields[i].value)
            refuse(name, "the two descriptors have different convolution geometries");
    return data;
}

} // namespace

template <typename data_t, typename weights_t>
sparse_backward<data_t, weights_t>::sparse_backward(
        const typename data_t::primitive_desc &data,
        const typename weights_t::primitive_desc &weights)
    : data_(checked_pair(data, weights)), weights_(weights),
      impl_info_(data.impl_info_str() + "/" + weights.impl_info_str()) {}

template <typename data_t, typename weights_t>
void sparse_backward<data_t, weights_t>::execute(const dnnl::stream &stream,
                                                 const exec_args &args) const {
    shared_gradient shared; // its scratch lives until both directions ran
    shared.wanted = weights_.kernel_->shared_form_read();
    // dY given as a BatchNorm's backward is rounded where it is computed when
    // backward-data reads it only to round it, backward-weights reads that
    // rounding, and no bias gradient wants dY itself.
    shared.diff_dst_source_taken = args.count(QSP_ARG_BN_DIFF_DST)
                                   && data_.kernel_->quantizes_diff_dst_only()
                                   && shared.wanted == shared_gradient::form::s8_plain_dy_q
                                   && !args.count(DNNL_ARG_DIFF_BIAS);
    data_.execute(stream, args, &shared);
    weights_.execute(stream, args, &shared);
}

template class sparse_backward<sparse_linear_backward_data, sparse_linear_backward_weights>;
template class sparse_backward<sparse_conv2d_backward_data, sparse_conv2d_backward_weights>;

} // namespace qsp
