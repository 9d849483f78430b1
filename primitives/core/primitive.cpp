// Primitives: creation builds the picked implementation's kernel (plans and
// generated code, from their caches when another primitive built them);
// execution checks the arguments against the descriptor, then runs it.
#include <atomic>
#include <sstream>

#include "primitives/core/kept_layout.hpp"
#include "primitives/core/pd_impl.hpp"
#include "primitives/core/s8_dy_quantization.hpp"
#include "primitives/core/testing_hooks.hpp"
#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/post_ops.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/verbose.hpp"

namespace qsp {

namespace detail {
namespace {
std::atomic<int64_t> epilogue_statistics_taken{0};
} // namespace

int64_t epilogue_statistics_taken_for_testing() {
    return epilogue_statistics_taken.load(std::memory_order_relaxed);
}
} // namespace detail

using namespace detail;

namespace {

// diff_dst as an int8 BatchNorm's backward describes it (QSP_ARG_BN_*).
struct batch_norm_source_args {
    const float *diff_dst = nullptr, *step = nullptr, *coefficients = nullptr;
    const uint8_t *mask = nullptr;
    const int8_t *centered = nullptr;
    bool any() const { return diff_dst || step || coefficients || mask || centered; }
    bool complete() const { return diff_dst && step && coefficients && centered; }
    batch_norm_gradient gradient(const problem &p) const {
        batch_norm_gradient g;
        g.diff_dst = diff_dst;
        g.bits = mask;
        g.src.values = centered;
        g.src.step = step;
        g.shape = {p.outer(), p.channels(), p.channel_inner()};
        g.a = coefficients;
        g.b = coefficients + p.channels();
        g.k = coefficients + 2 * p.channels();
        return g;
    }
};

// Arguments that change what an execution computes (src given quantized,
// diff_dst given as a BatchNorm's backward) are refused where the
// primitive does not take them, rather than ignored: ignored, the
// primitive would read an argument the caller did not fill.
void refuse_arguments_not_taken(const pd_impl &pd, const exec_args &args) {
    static constexpr std::pair<int, const char *> changing[] = {
            {QSP_ARG_SRC_S8, "src_s8 (s8 Conv2d forward only)"},
            {QSP_ARG_SRC_S8_SCALE, "src_s8_scale (s8 Conv2d forward only)"},
            {QSP_ARG_BN_DIFF_DST, "bn_diff_dst (s8 Conv2d backward only)"},
            {QSP_ARG_BN_MASK, "bn_mask (s8 Conv2d backward only)"},
            {QSP_ARG_BN_CENTERED, "bn_centered (s8 Conv2d backward only)"},
            {QSP_ARG_BN_STEP, "bn_step (s8 Conv2d backward only)"},
            {QSP_ARG_BN_COEFFICIENTS, "bn_coefficients (s8 Conv2d backward only)"}};
    for (const auto &[arg, name] : changing) {
        if (!args.count(arg)) continue;
        bool taken = false;
        for (const auto &spec : pd.args)
            taken |= spec.arg == arg;
        if (!taken)
            refuse(pd.primitive_name, std::string("execute: argument ") + name
                                              + " is not taken by this primitive ("
                                              + to_string(pd.prob.scheme) + ")");
    }
}

} // namespace

void primitive_base::init(const primitive_desc_base &pd) {
    pd_ = pd.impl();
    const double t0 = runtime::now_ms();
    kernel_ = pd_->impl->create(pd_->prob);
    if (verbose_level() >= 1) {
        std::ostringstream line;
        line << "create," << pd_->primitive_name << "," << pd_->impl_name << ","
             << to_string(pd_->prob.scheme) << "," << pd_->prob.shape_str()
             << ",threads=" << pd_->prob.num_threads << "," << runtime::now_ms() - t0;
        runtime::verbose_print(line.str());
    }
}

void primitive_base::execute(const dnnl::stream &stream, const exec_args &args) const {
    execute(stream, args, nullptr);
}

void primitive_base::execute(const dnnl::stream &stream, const exec_args &args,
                             shared_gradient *shared) const {
    const pd_impl &pd = *pd_;
    if (stream.get_engine().get_kind() != dnnl::engine::kind::cpu)
        refuse(pd.primitive_name, "stream must belong to a CPU engine");
    refuse_arguments_not_taken(pd, args);
    tensors t;
    batch_norm_source_args bn;
    const float *src_s8_scale = nullptr;
    std::vector<post_op_tensors> post(pd.post_op_chain.size());
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
                t.workspace = s8::workspace_view{static_cast<uint8_t *>(h), pd.prob, pd.src_kept};
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
            case QSP_ARG_SRC_ABS_MAX:
                t.src_abs_max = static_cast<const float *>(h);
                break;
            case QSP_ARG_SRC_S8:
                t.src_s8 = static_cast<const int8_t *>(h);
                break;
            case QSP_ARG_SRC_S8_SCALE:
                src_s8_scale = static_cast<const float *>(h);
                break;
            case QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX:
                t.diff_dst_channel_abs_max = static_cast<const float *>(h);
                break;
            case QSP_ARG_BN_DIFF_DST:
                bn.diff_dst = static_cast<const float *>(h);
                break;
            case QSP_ARG_BN_MASK:
                bn.mask = static_cast<const uint8_t *>(h);
                break;
            case QSP_ARG_BN_CENTERED:
                bn.centered = static_cast<const int8_t *>(h);
                break;
            case QSP_ARG_BN_STEP:
                bn.step = static_cast<const float *>(h);
                break;
            case QSP_ARG_BN_COEFFICIENTS:
                bn.coefficients = static_cast<const float *>(h);
                break;
            case QSP_ARG_ROUNDING_SEED: {
                const auto *s = static_cast<const uint32_t *>(h);
                t.seed = static_cast<uint64_t>(s[0]) | (static_cast<uint64_t>(s[1]) << 32);
                break;
            }
            default:
                if (spec.arg >= QSP_ARG_POST_OP_BASE) {
                    const int offset = spec.arg - QSP_ARG_POST_OP_BASE;
                    const auto index = static_cast<size_t>(offset / QSP_ARG_POST_OP_STRIDE);
                    switch (offset % QSP_ARG_POST_OP_STRIDE) {
                        case QSP_POST_OP_SRC:
                            post[index].src = static_cast<const float *>(h);
                            break;
                        case QSP_POST_OP_MASK:
                            post[index].mask = static_cast<uint8_t *>(h);
                            break;
                        case QSP_POST_OP_MEAN:
                            post[index].mean = static_cast<float *>(h);
                            break;
                        case QSP_POST_OP_VARIANCE:
                            post[index].variance = static_cast<float *>(h);
                            break;
                        default:
                            post[index].range = static_cast<float *>(h);
                            break;
                    }
                }
                break;
        }
    }
    if (!t.src_s8 != !src_s8_scale)
        refuse(pd.primitive_name, "execute: src_s8 and src_s8_scale go together (src given "
                                  "quantized: the integers and their scale)");
    if (src_s8_scale) t.src_s8_scale = *src_s8_scale;
    if (pd.prob.dir == direction::forward && !args.count(DNNL_ARG_SRC) && !t.src_s8)
        refuse(pd.primitive_name, "execute: argument src is required (dims "
                                          + dims_str(pd.src_md.get_dims())
                                          + "), or src_s8 with src_s8_scale");
    t.batch = pd.prob.outer();
    t.shared = shared;
    if (bn.any() && !bn.complete())
        refuse(pd.primitive_name,
               "execute: diff_dst given as a BatchNorm's backward needs bn_diff_dst, bn_centered, "
               "bn_step and bn_coefficients together (bn_mask with a ReLU)");
    const batch_norm_gradient bn_gradient = bn.any() ? bn.gradient(pd.prob) : batch_norm_gradient{};
    std::vector<float> bn_maxima;
    const double t0 = runtime::now_ms();
    const char *ran = nullptr;
    runtime::take_thread_kernel_ns(); // from zero: this execution's kernel time
    {
        runtime::profile_scope total(static_cast<runtime::profile_direction>(pd.prob.dir),
                                     runtime::profile_phase::total);
        if (bn.any()) {
            // The fused backward takes the BatchNorm's dY as such where both
            // directions read it only to round it (sparse_backward decides):
            // backward-data rounds it as it computes it, backward-weights reads
            // the shared rounding. Otherwise dY is written into DIFF_DST (once
            // per fused backward) and read from there.
            const bool taken = shared && shared->diff_dst_source_taken;
            if (taken && pd.prob.dir == direction::backward_data) {
                t.diff_dst_source = &bn_gradient;
                if (!t.diff_dst_channel_abs_max) { // the rounding's maxima, dY not written
                    bn_maxima.resize(static_cast<size_t>(pd.prob.channels()));
                    masked_gradient_apply(bn_gradient, nullptr, bn_maxima.data(),
                                          pd.prob.num_threads);
                    t.diff_dst_channel_abs_max = bn_maxima.data();
                }
            } else if (!(taken && shared->kind == shared_gradient::form::s8_plain_dy_q)) {
                s8::write_batch_norm_dy(bn_gradient, t, pd.prob.num_threads);
            }
        }
        // the chain's first batch statistics are of dst as written: the
        // kernel may take them while it writes it
        const bool statistics_first =
                !pd.post_op_chain.empty() && !pd.dst_kept
                && pd.post_op_chain.front() == post_ops::kind::batch_statistics;
        const auto channels = static_cast<size_t>(pd.prob.channels());
        std::vector<double> statistics_mean(statistics_first ? channels : 0),
                statistics_var(statistics_mean.size());
        std::vector<channel_range> statistics_range(
                statistics_first && post.front().range ? channels : 0);
        dst_statistics_request statistics{statistics_mean.data(), statistics_var.data(),
                                          statistics_range.empty() ? nullptr
                                                                   : statistics_range.data()};
        if (statistics_first) t.dst_statistics = &statistics;
        if (pd.kept_native) {
            t.src_kept = pd.src_kept;
            t.dst_kept = pd.dst_kept;
            ran = kernel_->execute(t);
        } else {
            ran = run_on_plain_layout(
                    pd.prob, t, pd.src_kept, pd.dst_kept,
                    [this](const tensors &plain) { return kernel_->execute(plain); });
        }
        if (!pd.post_op_chain.empty()) {
            // kept: each tile is an outer index, its 64 lanes a channel's inner run
            const channel_layout dst_layout =
                    pd.dst_kept ? channel_layout{tile_count(t.batch), pd.prob.channels(),
                                                 jit::tile_batch}
                                : channel_layout{pd.prob.outer(), pd.prob.channels(),
                                                 pd.prob.channel_inner()};
            size_t first = 0;
            if (statistics.written) { // the kernel's statistics stand for the first post-op
                epilogue_statistics_taken.fetch_add(1, std::memory_order_relaxed);
                const post_op_tensors &out = post.front();
                for (size_t c = 0; c < channels; ++c) {
                    out.mean[c] = static_cast<float>(statistics_mean[c]);
                    out.variance[c] = static_cast<float>(statistics_var[c]);
                    if (out.range) {
                        out.range[2 * c] = statistics_range[c].lowest;
                        out.range[2 * c + 1] = statistics_range[c].highest;
                    }
                }
                first = 1;
            }
            apply_post_ops(pd.post_op_chain, post, t.dst, dst_layout, pd.prob.num_threads, first);
        }
    }
    if (verbose_level() >= 1) {
        std::ostringstream line;
        line << "exec," << pd.primitive_name << "," << (ran ? ran : pd.impl_name.c_str()) << ","
             << to_string(pd.prob.scheme) << "," << pd.prob.shape_str()
             << ",threads=" << pd.prob.num_threads << "," << runtime::now_ms() - t0;
        if (runtime::profiling_enabled()) { // QSP_VERBOSE=profile: where the time went
            const double kernel = static_cast<double>(runtime::take_thread_kernel_ns()) * 1e-6;
            line << ",kernel_ms=" << kernel << ",passes_ms=" << runtime::now_ms() - t0 - kernel;
        }
        runtime::verbose_print(line.str());
    }
}

} // namespace qsp
