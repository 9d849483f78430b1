// What every primitive descriptor shares: argument checks, the argument
// list of each direction, and the pick of an implementation.
#include <algorithm>
#include <omp.h>

#include <sstream>
#include <stdexcept>

#include "primitives/core/kept_layout.hpp"
#include "primitives/core/pd_impl.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "primitives/core/tuner.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/verbose.hpp"

namespace qsp {

namespace detail {

[[noreturn]] void refuse(const char *primitive_name, const std::string &why) {
    throw std::invalid_argument(std::string(primitive_name) + ": " + why);
}

std::string dims_str(const dnnl::memory::dims &d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i)
        s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

void check_plain_f32(const char *primitive_name, const char *arg_name, const dnnl::memory::desc &md,
                     const dnnl::memory::dims &dims, const char *meaning) {
    std::ostringstream why;
    if (md.is_zero()) {
        why << arg_name << " is required (" << meaning << " = " << dims_str(dims) << ")";
        refuse(primitive_name, why.str());
    }
    if (md.get_data_type() != dnnl::memory::data_type::f32) {
        why << arg_name << " must be f32, got data type " << static_cast<int>(md.get_data_type());
        refuse(primitive_name, why.str());
    }
    if (md.get_dims() != dims) {
        why << arg_name << " must have dims " << meaning << " = " << dims_str(dims) << ", got "
            << dims_str(md.get_dims());
        refuse(primitive_name, why.str());
    }
    if (md.get_format_kind() != dnnl::memory::format_kind::blocked
        || md.get_strides() != plain_f32_desc(dims).get_strides()) {
        why << arg_name << " must be dense row-major (strides "
            << dims_str(plain_f32_desc(dims).get_strides()) << "); pass a contiguous tensor";
        refuse(primitive_name, why.str());
    }
}

int resolve_num_threads(const primitive_attr &attr, const char *primitive_name, int fallback) {
    if (attr.num_threads < 0 || attr.num_threads > max_num_threads())
        refuse(primitive_name,
               "attr.num_threads must be in [0, " + std::to_string(max_num_threads())
                       + "] (0 = default; the upper bound is max_num_threads()), got "
                       + std::to_string(attr.num_threads));
    if (attr.num_threads > 0) return attr.num_threads;
    return fallback > 0 ? fallback : omp_get_max_threads();
}

std::vector<const implementation *> accepting_implementations(const problem &p,
                                                              std::vector<refusal> *refusals) {
    std::vector<const implementation *> out;
    for (const auto &impl : implementation_list()) {
        if (impl.op && *impl.op != p.op) continue;
        std::string why = impl.why_not(p);
        if (why.empty())
            out.push_back(&impl);
        else if (refusals)
            refusals->push_back(refusal{impl.name, std::move(why)});
    }
    return out;
}

namespace {

void pick(pd_impl &pd) {
    std::vector<refusal> refusals;
    const auto candidates = accepting_implementations(pd.prob, &refusals);
    std::string all_reasons;
    for (const refusal &r : refusals) {
        if (verbose_level() >= 2)
            runtime::verbose_print(std::string("dispatch,") + pd.primitive_name + ","
                                   + r.implementation + ",skipped: " + r.reason);
        all_reasons +=
                (all_reasons.empty() ? "" : "; ") + std::string(r.implementation) + ": " + r.reason;
    }
    if (candidates.empty())
        refuse(pd.primitive_name, "no implementation accepts this problem (" + all_reasons + ")");
    const implementation *chosen = candidates.front();
    const char *why = " (first accepting in list order)";
    if (!pd.forced_impl.empty()) {
        chosen = nullptr;
        for (const implementation *c : candidates)
            if (pd.forced_impl == c->name) chosen = c;
        if (!chosen) {
            std::vector<std::string> known; // this operation's names, once each
            std::string reason;
            for (const auto &impl : implementation_list()) {
                if (impl.op && *impl.op != pd.prob.op) continue;
                if (std::find(known.begin(), known.end(), impl.name) == known.end())
                    known.emplace_back(impl.name);
                if (pd.forced_impl == impl.name) reason = impl.why_not(pd.prob);
            }
            std::string names;
            for (const std::string &n : known)
                names += (names.empty() ? "" : ", ") + n;
            refuse(pd.primitive_name,
                   "attr.implementation '" + pd.forced_impl + "' "
                           + (reason.empty() ? "is not an implementation of this operation (known: "
                                                       + names + ")"
                                             : "cannot run this problem: " + reason));
        }
        why = " (forced by attr.implementation)";
    } else {
        const std::string stored = stored_decision(pd.prob);
        for (const implementation *c : candidates)
            if (!stored.empty() && stored == c->name) {
                chosen = c;
                why = " (tuned decision)";
            }
    }
    if (verbose_level() >= 2)
        runtime::verbose_print(std::string("dispatch,") + pd.primitive_name + ",picked "
                               + chosen->name + why);
    pd.impl_name = chosen->name;
    pd.impl = chosen;
    pd.kept_native = chosen->kept_layout_native && chosen->kept_layout_native(pd.prob);
}

// The optional QSP_ARG_BN_* arguments of an s8 Conv2d backward: diff_dst
// given as the int8 BatchNorm's backward after the convolution.
void add_batch_norm_source_args(pd_impl &pd) {
    if (pd.prob.op != op_kind::conv2d) return;
    const batch_norm_source_descs d = batch_norm_source_descriptors(pd.dst_md.get_dims());
    pd.args.push_back({QSP_ARG_BN_DIFF_DST, "bn_diff_dst", d.diff_dst, false});
    pd.args.push_back({QSP_ARG_BN_MASK, "bn_mask", d.mask, false});
    pd.args.push_back({QSP_ARG_BN_CENTERED, "bn_centered", d.centered, false});
    pd.args.push_back({QSP_ARG_BN_STEP, "bn_step", d.step, false});
    pd.args.push_back({QSP_ARG_BN_COEFFICIENTS, "bn_coefficients", d.coefficients, false});
}

// The arguments of each post-op, and the chain the primitive applies.
void add_post_op_args(pd_impl &pd, const post_ops &ops) {
    const problem &p = pd.prob;
    const dnnl::memory::desc per_channel = plain_f32_desc({p.channels()}),
                             channel_pairs = plain_f32_desc({p.channels(), 2});
    // kept: the mask covers the tiles, padding included
    const int64_t dst_elems = pd.dst_kept ? kept_elems(p.batch, p.out) : p.dst_elems();
    const dnnl::memory::desc mask({(dst_elems + 7) / 8}, dnnl::memory::data_type::u8,
                                  dnnl::memory::dims{1});
    for (int i = 0; i < ops.len(); ++i) {
        if (ops.at(i) == post_ops::kind::batch_statistics && pd.dst_kept)
            refuse(pd.primitive_name, "post-op batch_statistics needs a plain dst (in the kept "
                                      "layout the tiles' padding would count); got "
                                      "kept_layout_desc");
        pd.post_op_chain.push_back(ops.at(i));
        switch (ops.at(i)) {
            case post_ops::kind::relu:
                pd.args.push_back(
                        {QSP_ARG_POST_OP(i, QSP_POST_OP_MASK), "post-op relu mask", mask, false});
                break;
            case post_ops::kind::add:
                pd.args.push_back(
                        {QSP_ARG_POST_OP(i, QSP_POST_OP_SRC), "post-op add src", pd.dst_md, true});
                break;
            case post_ops::kind::batch_statistics:
                pd.args.push_back(
                        {QSP_ARG_POST_OP(i, QSP_POST_OP_MEAN), "post-op mean", per_channel, true});
                pd.args.push_back({QSP_ARG_POST_OP(i, QSP_POST_OP_VARIANCE), "post-op variance",
                                   per_channel, true});
                pd.args.push_back({QSP_ARG_POST_OP(i, QSP_POST_OP_RANGE), "post-op range",
                                   channel_pairs, false});
                break;
            case post_ops::kind::gelu_tanh:
            case post_ops::kind::gelu_erf:
                break;
        }
    }
}

} // namespace

void finish_pd(pd_impl &pd, const dnnl::engine &engine, const primitive_attr &attr) {
    if (engine.get_kind() != dnnl::engine::kind::cpu)
        refuse(pd.primitive_name, "engine must be a CPU engine (dnnl::engine::kind::cpu)");
    if (attr.ops.len() > 0 && pd.prob.dir != direction::forward)
        refuse(pd.primitive_name, std::string("post-ops apply to forward primitives; got ")
                                          + std::to_string(attr.ops.len())
                                          + " (first: " + qsp::to_string(attr.ops.at(0)) + ")");
    pd.engine = engine;
    pd.forced_impl = attr.implementation;
    const problem &p = pd.prob;
    pd.weights_md = plain_f32_desc({p.pattern.nnz()});
    const dnnl::memory::desc ws_md(
            {static_cast<dnnl::memory::dim>(s8::workspace_bytes(p, pd.src_kept))},
            dnnl::memory::data_type::u8, dnnl::memory::dims{1});
    // Every direction of an s8 training step describes the one workspace
    // the forward fills and both backward directions read (oneDNN's habit).
    pd.workspace_md = p.needs_workspace() ? ws_md : dnnl::memory::desc();
    const bool s8 = p.scheme == quant_scheme::s8;
    switch (p.dir) {
        case direction::forward:
            pd.args = {{DNNL_ARG_SRC, "src", pd.src_md, true},
                       {DNNL_ARG_WEIGHTS, "weights", pd.weights_md, true},
                       {DNNL_ARG_DST, "dst", pd.dst_md, true}};
            if (p.with_bias) pd.args.push_back({DNNL_ARG_BIAS, "bias", pd.bias_md, true});
            if (!pd.workspace_md.is_zero())
                pd.args.push_back({DNNL_ARG_WORKSPACE, "workspace", pd.workspace_md, true});
            if (s8)
                pd.args.push_back({QSP_ARG_SRC_ABS_MAX, "src_abs_max", src_abs_max_desc(), false});
            if (s8 && p.op == op_kind::conv2d) { // src given quantized: SRC may be left out
                pd.args.front().required = false;
                pd.args.push_back(
                        {QSP_ARG_SRC_S8, "src_s8",
                         dnnl::memory::desc(pd.src_md.get_dims(), dnnl::memory::data_type::s8,
                                            pd.src_md.get_strides()),
                         false});
                pd.args.push_back(
                        {QSP_ARG_SRC_S8_SCALE, "src_s8_scale", plain_f32_desc({1}), false});
            }
            add_post_op_args(pd, attr.ops);
            break;
        case direction::backward_data:
            // s8 reads the weights the forward quantized (from the
            // workspace) instead of quantizing them a second time.
            pd.args = {{DNNL_ARG_DIFF_DST, "diff_dst", pd.dst_md, true},
                       s8 ? arg_spec{DNNL_ARG_WORKSPACE,
                                     "workspace (the forward's quantized weights)", ws_md, true}
                          : arg_spec{DNNL_ARG_WEIGHTS, "weights", pd.weights_md, true},
                       {DNNL_ARG_DIFF_SRC, "diff_src", pd.src_md, true}};
            if (s8) {
                pd.args.push_back(
                        {QSP_ARG_ROUNDING_SEED, "rounding_seed", rounding_seed_desc(), true});
                pd.args.push_back({QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX, "diff_dst_channel_abs_max",
                                   diff_dst_channel_abs_max_desc(p.channels()), false});
                add_batch_norm_source_args(pd);
            }
            break;
        case direction::backward_weights:
            pd.args = {{DNNL_ARG_DIFF_DST, "diff_dst", pd.dst_md, true},
                       {DNNL_ARG_DIFF_WEIGHTS, "diff_weights", pd.weights_md, true}};
            if (s8) {
                pd.args.push_back({DNNL_ARG_WORKSPACE, "workspace (the forward's quantized src)",
                                   ws_md, true});
                pd.args.push_back(
                        {QSP_ARG_ROUNDING_SEED, "rounding_seed", rounding_seed_desc(), true});
                pd.args.push_back({QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX, "diff_dst_channel_abs_max",
                                   diff_dst_channel_abs_max_desc(p.channels()), false});
                add_batch_norm_source_args(pd);
            } else {
                pd.args.push_back({DNNL_ARG_SRC, "src", pd.src_md, true});
            }
            if (p.with_bias) pd.args.push_back({DNNL_ARG_DIFF_BIAS, "diff_bias", pd.bias_md, true});
            break;
    }
    if (!attr.tune || !pd.forced_impl.empty()) {
        pick(pd);
        return;
    }
    tuning_result r = tune_problem(pd, tuning_options{}); // stores the decision pick() reads
    pick(pd);
    if (r.chosen.empty()) r.chosen = r.incumbent = pd.impl_name; // only the reference accepts
    pd.tuning = std::make_shared<const tuning_result>(std::move(r));
}

void check_hint(const char *primitive_name, const pd_impl &hint, const csr_pattern &weights) {
    if (hint.prob.pattern != weights)
        refuse(primitive_name, "weights pattern differs from the one of the forward hint");
    if (hint.prob.scheme == quant_scheme::s8 && hint.prob.prop != prop_kind::forward_training)
        refuse(primitive_name, "an s8 backward needs a forward_training hint (its workspace "
                               "holds the quantized src); got forward_inference");
}

} // namespace detail

const char *to_string(post_ops::kind k) {
    switch (k) {
        case post_ops::kind::relu:
            return "relu";
        case post_ops::kind::gelu_tanh:
            return "gelu_tanh";
        case post_ops::kind::gelu_erf:
            return "gelu_erf";
        case post_ops::kind::add:
            return "add";
        case post_ops::kind::batch_statistics:
            return "batch_statistics";
    }
    return "?";
}

std::string primitive_desc_base::impl_info_str() const {
    return impl_->impl_name;
}
const char *primitive_desc_base::primitive_name() const {
    return impl_->primitive_name;
}
quant_scheme primitive_desc_base::scheme() const {
    return impl_->prob.scheme;
}
prop_kind primitive_desc_base::prop() const {
    return impl_->prob.prop;
}
const csr_pattern &primitive_desc_base::pattern() const {
    return impl_->prob.pattern;
}
int primitive_desc_base::num_threads() const {
    return impl_->prob.num_threads;
}
dnnl::memory::desc primitive_desc_base::weights_desc() const {
    return impl_->weights_md;
}
dnnl::memory::desc primitive_desc_base::workspace_desc() const {
    return impl_->workspace_md;
}
const tuning_result *primitive_desc_base::tuning() const {
    return impl_->tuning.get();
}
bool primitive_desc_base::takes_kept_layout() const {
    return impl_->kept_native;
}

batch_norm_source_descs batch_norm_source_descriptors(const dnnl::memory::dims &dst_dims) {
    if (dst_dims.size() != 4)
        throw std::invalid_argument(
                "batch_norm_source_descriptors: dst_dims must be {N, C, H, W}, got "
                + detail::dims_str(dst_dims));
    dnnl::memory::dim n = 1;
    for (const auto d : dst_dims)
        n *= d;
    const dnnl::memory::dim c = dst_dims[1];
    return {plain_f32_desc(dst_dims),
            dnnl::memory::desc({(n + 7) / 8}, dnnl::memory::data_type::u8, dnnl::memory::dims{1}),
            dnnl::memory::desc({n}, dnnl::memory::data_type::s8, dnnl::memory::dims{1}),
            plain_f32_desc({c}), plain_f32_desc({3, c})};
}

} // namespace qsp
