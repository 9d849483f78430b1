// The parts every primitive shares: dispatch, argument checking, execution,
// verbose output, and the dense-semantics path for non-finite inputs.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "primitives/nonfinite.hpp"
#include "primitives/primitive_impl.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/kernel_cache.hpp"
#include "runtime/verbose.hpp"

namespace qsp {

const char *to_string(quant_scheme s) {
    return s == quant_scheme::s8 ? "s8" : "f32";
}

namespace detail {

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
    }
    s << ",density=" << pattern.density() << ",nnz=" << pattern.nnz();
    return s.str();
}

[[noreturn]] void refuse(const char *primitive_name, const std::string &why) {
    throw std::invalid_argument(std::string(primitive_name) + ": " + why);
}

std::string dims_str(const dnnl::memory::dims &d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i)
        s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

dnnl::memory::desc plain_f32(const dnnl::memory::dims &dims) {
    dnnl::memory::dims strides(dims.size(), 1);
    for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i)
        strides[i] = strides[i + 1] * dims[i + 1];
    return dnnl::memory::desc(dims, dnnl::memory::data_type::f32, strides);
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
        || md.get_strides() != plain_f32(dims).get_strides()) {
        why << arg_name << " must be dense row-major (strides "
            << dims_str(plain_f32(dims).get_strides()) << "); pass a contiguous tensor";
        refuse(primitive_name, why.str());
    }
}

int resolve_num_threads(const primitive_attr &attr, const char *primitive_name) {
    if (attr.num_threads < 0)
        refuse(primitive_name, "attr.num_threads must be >= 0 (0 = OpenMP default), got "
                                       + std::to_string(attr.num_threads));
    return attr.num_threads > 0 ? attr.num_threads : omp_get_max_threads();
}

namespace {

bool measuring_enabled() {
    const char *env = std::getenv("QSP_DISPATCH");
    return !(env && std::strcmp(env, "first") == 0);
}

// Median ms of a few executions of k on random data of p's shapes.
double measure(const problem &p, const kernel &k) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    auto filled = [&](int64_t n) {
        std::vector<float> v(static_cast<size_t>(std::max<int64_t>(n, 1)));
        for (float &x : v)
            x = u(rng);
        return v;
    };
    auto src = filled(p.src_elems()), dst = filled(p.dst_elems()), w = filled(p.pattern.nnz()),
         bias = filled(p.channels()), dsrc = filled(p.src_elems()), ddst = filled(p.dst_elems()),
         dw = filled(p.pattern.nnz()), db = filled(p.channels());
    std::vector<uint8_t> ws(workspace_bytes(p));
    const float one = 1.f;
    std::memcpy(ws.data(), &one, sizeof(float));
    for (size_t i = workspace_header_bytes; i < ws.size(); ++i)
        ws[i] = static_cast<uint8_t>(rng());
    tensors t;
    t.src = src.data();
    t.weights = w.data();
    t.bias = p.with_bias ? bias.data() : nullptr;
    t.dst = dst.data();
    t.workspace = p.scheme == quant_scheme::s8 ? ws.data() : nullptr;
    t.diff_dst = ddst.data();
    t.diff_src = dsrc.data();
    t.diff_weights = dw.data();
    t.diff_bias = p.with_bias ? db.data() : nullptr;
    t.batch = p.outer();
    std::vector<double> times;
    for (int r = 0; r < 4; ++r) {
        const double t0 = runtime::now_ms();
        k.execute(t);
        if (r > 0) times.push_back(runtime::now_ms() - t0); // the first run warms caches
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// Decisions are remembered per problem (not per descriptor): measuring once
// per layer shape is enough.
std::mutex decisions_mutex;
std::unordered_map<runtime::kernel_key, std::string, runtime::kernel_key_hash> decisions;

runtime::kernel_key decision_key(const pd_impl &pd) {
    const problem &p = pd.prob;
    return runtime::kernel_key{pd.primitive_name,
                               static_cast<int>(p.dir),
                               {p.batch, p.in, p.out, p.src_elems(), p.dst_elems()},
                               static_cast<int>(p.scheme),
                               static_cast<int>(effective_cpu_isa()),
                               p.num_threads,
                               p.pattern.hash()};
}

} // namespace

void dispatch(pd_impl &pd, const dnnl::engine &engine) {
    if (engine.get_kind() != dnnl::engine::kind::cpu)
        refuse(pd.primitive_name, "engine must be a CPU engine (dnnl::engine::kind::cpu)");
    pd.engine = engine;
    const double t0 = runtime::now_ms();
    std::string skipped;
    std::vector<const implementation *> candidates;
    for (const auto &impl : implementation_list()) {
        std::string why = impl.why_not(pd.prob);
        if (!why.empty()) {
            if (verbose_level() >= 2)
                runtime::verbose_print(std::string("dispatch,") + pd.primitive_name + ","
                                       + impl.name + ",skipped: " + why);
            skipped += std::string(skipped.empty() ? "" : "; ") + impl.name + ": " + why;
            continue;
        }
        candidates.push_back(&impl);
    }
    if (candidates.empty())
        refuse(pd.primitive_name, "no implementation accepts this problem (" + skipped + ")");
    // The list is ordered fastest-first by expectation; where several
    // optimised implementations accept a problem (the reference never
    // competes), the fastest *measured* on this layer's shape wins.
    const implementation *chosen = candidates.front();
    std::shared_ptr<const kernel> chosen_kernel;
    std::vector<const implementation *> contenders;
    for (const implementation *c : candidates)
        if (std::string(c->name) != "ref:any") contenders.push_back(c);
    if (contenders.size() > 1 && measuring_enabled()) {
        const auto key = decision_key(pd);
        std::string remembered;
        {
            std::lock_guard<std::mutex> lock(decisions_mutex);
            auto it = decisions.find(key);
            if (it != decisions.end()) remembered = it->second;
        }
        std::ostringstream report;
        double best = 0;
        for (const implementation *c : contenders) {
            if (!remembered.empty() && remembered != c->name) continue;
            auto k = c->create(pd.prob);
            const double ms = remembered.empty() ? measure(pd.prob, *k) : 0.0;
            report << (report.tellp() > 0 ? "," : "") << c->name << "=" << ms;
            if (!chosen_kernel || ms < best) {
                best = ms;
                chosen = c;
                chosen_kernel = k;
            }
        }
        if (remembered.empty()) {
            std::lock_guard<std::mutex> lock(decisions_mutex);
            decisions[key] = chosen->name;
        }
        if (verbose_level() >= 2)
            runtime::verbose_print(std::string("dispatch,") + pd.primitive_name + ",measured,"
                                   + (remembered.empty() ? report.str() : "remembered") + ",chose "
                                   + chosen->name);
    }
    pd.impl_name = chosen->name;
    pd.kern = chosen_kernel ? chosen_kernel : chosen->create(pd.prob);
    if (verbose_level() >= 1) {
        std::ostringstream line;
        line << "create," << pd.primitive_name << "," << pd.impl_name << ","
             << to_string(pd.prob.scheme) << "," << pd.prob.shape_str()
             << ",threads=" << pd.prob.num_threads << "," << runtime::now_ms() - t0;
        runtime::verbose_print(line.str());
    }
}

dnnl::memory::desc seed_desc() {
    return dnnl::memory::desc({2}, dnnl::memory::data_type::s32, dnnl::memory::dims{1});
}

void finish_pd(pd_impl &pd, const dnnl::engine &engine) {
    const problem &p = pd.prob;
    pd.weights_md = plain_f32({p.pattern.nnz()});
    pd.workspace_md =
            p.needs_workspace() && p.dir == direction::forward
                    ? dnnl::memory::desc({static_cast<dnnl::memory::dim>(workspace_bytes(p))},
                                         dnnl::memory::data_type::u8, dnnl::memory::dims{1})
                    : dnnl::memory::desc();
    const dnnl::memory::desc ws_md({static_cast<dnnl::memory::dim>(workspace_bytes(p))},
                                   dnnl::memory::data_type::u8, dnnl::memory::dims{1});
    const bool s8 = p.scheme == quant_scheme::s8;
    switch (p.dir) {
        case direction::forward:
            pd.args = {{DNNL_ARG_SRC, "src", pd.src_md, true},
                       {DNNL_ARG_WEIGHTS, "weights", pd.weights_md, true},
                       {DNNL_ARG_DST, "dst", pd.dst_md, true}};
            if (p.with_bias) pd.args.push_back({DNNL_ARG_BIAS, "bias", pd.bias_md, true});
            if (!pd.workspace_md.is_zero())
                pd.args.push_back({DNNL_ARG_WORKSPACE, "workspace", pd.workspace_md, true});
            break;
        case direction::backward_data:
            pd.args = {{DNNL_ARG_DIFF_DST, "diff_dst", pd.dst_md, true},
                       {DNNL_ARG_WEIGHTS, "weights", pd.weights_md, true},
                       {DNNL_ARG_DIFF_SRC, "diff_src", pd.src_md, true}};
            if (s8) pd.args.push_back({QSP_ARG_ROUNDING_SEED, "rounding_seed", seed_desc(), true});
            break;
        case direction::backward_weights:
            pd.args = {{DNNL_ARG_DIFF_DST, "diff_dst", pd.dst_md, true},
                       {DNNL_ARG_DIFF_WEIGHTS, "diff_weights", pd.weights_md, true}};
            if (s8) {
                pd.args.push_back({DNNL_ARG_WORKSPACE, "workspace (the forward's quantized src)",
                                   ws_md, true});
                pd.args.push_back({QSP_ARG_ROUNDING_SEED, "rounding_seed", seed_desc(), true});
            } else {
                pd.args.push_back({DNNL_ARG_SRC, "src", pd.src_md, true});
            }
            if (p.with_bias) pd.args.push_back({DNNL_ARG_DIFF_BIAS, "diff_bias", pd.bias_md, true});
            break;
    }
    dispatch(pd, engine);
}

void check_hint(const char *primitive_name, const pd_impl &hint, const csr_pattern &weights) {
    if (hint.prob.pattern.hash() != weights.hash() || hint.prob.pattern.rows() != weights.rows()
        || hint.prob.pattern.cols() != weights.cols())
        refuse(primitive_name, "weights pattern differs from the one of the forward hint");
    if (hint.prob.scheme == quant_scheme::s8 && hint.prob.prop != prop_kind::forward_training)
        refuse(primitive_name, "an s8 backward needs a forward_training hint (its workspace "
                               "holds the quantized src); got forward_inference");
}

} // namespace detail

std::string primitive_desc_base::impl_info_str() const {
    return impl_->impl_name;
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

void primitive_base::execute(const dnnl::stream &stream, const exec_args &args) const {
    using namespace detail;
    const pd_impl &pd = *pd_;
    if (stream.get_engine().get_kind() != dnnl::engine::kind::cpu)
        refuse(pd.primitive_name, "stream must belong to a CPU engine");
    tensors t;
    for (const auto &spec : pd.args) {
        auto it = args.find(spec.arg);
        if (it == args.end()) {
            if (spec.required)
                refuse(pd.primitive_name, std::string("execute: argument ") + spec.name
                                                  + " is required (dims "
                                                  + dims_str(spec.desc.get_dims()) + ")");
            continue;
        }
        if (it->second.get_desc() != spec.desc)
            refuse(pd.primitive_name,
                   std::string("execute: argument ") + spec.name
                           + " does not match the descriptor it was created with (expected dims "
                           + dims_str(spec.desc.get_dims()) + ", got "
                           + dims_str(it->second.get_desc().get_dims()) + ")");
        void *h = it->second.get_data_handle();
        if (!h && spec.desc.get_size() > 0)
            refuse(pd.primitive_name,
                   std::string("execute: argument ") + spec.name + " has no data handle");
        switch (spec.arg) {
            case DNNL_ARG_SRC:
                t.src = static_cast<const float *>(h);
                break;
            case DNNL_ARG_WEIGHTS:
                t.weights = static_cast<const float *>(h);
                break;
            case DNNL_ARG_BIAS:
                t.bias = static_cast<const float *>(h);
                break;
            case DNNL_ARG_DST:
                t.dst = static_cast<float *>(h);
                break;
            case DNNL_ARG_WORKSPACE:
                t.workspace = static_cast<uint8_t *>(h);
                break;
            case DNNL_ARG_DIFF_DST:
                t.diff_dst = static_cast<const float *>(h);
                break;
            case DNNL_ARG_DIFF_SRC:
                t.diff_src = static_cast<float *>(h);
                break;
            case DNNL_ARG_DIFF_WEIGHTS:
                t.diff_weights = static_cast<float *>(h);
                break;
            case DNNL_ARG_DIFF_BIAS:
                t.diff_bias = static_cast<float *>(h);
                break;
            case QSP_ARG_ROUNDING_SEED: {
                const auto *s = static_cast<const uint32_t *>(h);
                t.seed = static_cast<uint64_t>(s[0]) | (static_cast<uint64_t>(s[1]) << 32);
                break;
            }
            default:
                break;
        }
    }
    t.batch = pd.prob.outer();
    const double t0 = runtime::now_ms();
    const char *how = pd.impl_name.c_str();
    if (needs_dense_semantics(pd.prob, t)) {
        // Dense torch turns 0 * Inf into NaN at every pruned weight; a sparse
        // kernel never sees those zeros, so rows with non-finite inputs take
        // the dense-weight reference path (rare, and exact).
        execute_with_dense_semantics(pd.prob, t);
        how = "ref:dense_semantics";
    } else {
        pd.kern->execute(t);
    }
    if (verbose_level() >= 1) {
        std::ostringstream line;
        line << "exec," << pd.primitive_name << "," << how << "," << to_string(pd.prob.scheme)
             << "," << pd.prob.shape_str() << ",threads=" << pd.prob.num_threads << ","
             << runtime::now_ms() - t0;
        runtime::verbose_print(line.str());
    }
}

} // namespace qsp
