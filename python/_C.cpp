// qsparseprop._C: the pybind11 bridge from Python to the C++ primitives.
// It knows numpy buffers, not torch (the package passes tensor.numpy()
// views, zero-copy), so the module builds without torch headers and works
// with any torch build. Each layer object keeps its primitives for the last
// few (input shape, thread count) pairs; the pattern is fixed at
// construction. The first time a layer sees a shape its forward is tuned
// (qsp::tune) unless QSP_TUNE=0, and its two backward directions the first
// time a backward of that shape runs (an evaluation-only batch size needs
// none); on fewer threads than it ran on before, the shape runs the larger
// team's implementations again.
#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <list>
#include <mutex>
#include <sstream>
#include <tuple>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <oneapi/dnnl/dnnl.hpp>

#include "primitives/core/s8_protocol.hpp"
#include "primitives/core/testing_hooks.hpp"
#include "qsparseprop/qsparseprop.hpp"

namespace py = pybind11;

namespace {

using dims = std::vector<int64_t>;

std::string shape_str(const dims &d) {
    std::ostringstream s;
    s << "(";
    for (size_t i = 0; i < d.size(); ++i)
        s << (i ? ", " : "") << d[i];
    s << (d.size() == 1 ? ",)" : ")");
    return s.str();
}

// A C-contiguous buffer of the right dtype and shape, or a TypeError /
// ValueError that names the argument.
template <typename T>
T *checked(const py::array &a, const char *name, const dims &shape, bool writable) {
    if (!a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + " must have dtype "
                             + std::string(py::str(py::dtype::of<T>())) + ", got "
                             + std::string(py::str(a.dtype())));
    dims got(a.shape(), a.shape() + a.ndim());
    if (got != shape)
        throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + ", got "
                              + shape_str(got));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
    return static_cast<T *>(const_cast<void *>(a.data()));
}

int64_t flat_length(const py::array &a, const char *name) {
    if (a.ndim() != 1)
        throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim())
                              + "-D");
    return a.shape(0);
}

constexpr auto f32_md = &qsp::plain_f32_desc;

// Tests only: the implementations (forward, backward-data, backward-weights,
// as impl_info_str() names them) a layer's next shape is built with, when no
// team size has run it yet; empty names: picked as usual.
std::array<std::string, 3> &implementations_forced_for_testing() {
    static std::array<std::string, 3> names;
    return names;
}

// An array whose memory is lent by the library's pool and given back when
// the array (and whatever tensor wraps it) is freed: outputs of every step
// reuse pages that are already mapped instead of faulting in fresh ones.
template <typename T> py::array_t<T> pooled_array(const dims &shape) {
    size_t n = 1;
    for (int64_t d : shape)
        n *= static_cast<size_t>(d);
    void *p = qsp::acquire_output_buffer(std::max<size_t>(n * sizeof(T), 1));
    py::capsule owner(p, [](void *q) { qsp::release_output_buffer(q); });
    return py::array_t<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()), static_cast<T *>(p),
                          owner);
}

// The numpy array `a` itself (never a converted temporary, whose data would
// die with it), or a TypeError naming the argument.
py::array as_array(const py::object &a, const char *name) {
    if (!py::isinstance<py::array>(a))
        throw py::type_error(std::string(name) + " must be a numpy array, got "
                             + std::string(py::str(py::type::of(a))));
    return py::reinterpret_borrow<py::array>(a);
}

// A C-contiguous float32 array of `shape`, or nullptr for None.
const float *optional_f32(const py::object &a, const char *name, const dims &shape) {
    if (a.is_none()) return nullptr;
    return checked<float>(as_array(a, name), name, shape, false);
}

// A BatchNorm's src statistics as the convolution that wrote src took them
// (None, or 4 x C floats: mean, variance, lowest and highest per channel),
// viewed in `given`; null for None.
const qsp::batch_norm_known_statistics *known_statistics(const py::object &known, int64_t channels,
                                                         qsp::batch_norm_known_statistics &given) {
    const float *k = optional_f32(known, "known", {4 * channels});
    if (!k) return nullptr;
    given.mean = k, given.variance = k + channels, given.range = k + 2 * channels;
    return &given;
}

qsp::batch_norm_relu_desc batch_norm_desc(const py::array &src, double eps, bool batch_statistics,
                                          bool relu) {
    if (src.ndim() != 4)
        throw py::value_error("src must be 4-D (N, C, H, W), got " + std::to_string(src.ndim())
                              + "-D");
    qsp::batch_norm_relu_desc d;
    d.batch = src.shape(0);
    d.channels = src.shape(1);
    d.spatial = src.shape(2) * src.shape(3);
    d.epsilon = eps;
    d.batch_statistics = batch_statistics;
    d.relu = relu;
    return d;
}

qsp::quant_scheme scheme_from(const std::string &s) {
    if (s == "f32") return qsp::quant_scheme::f32;
    if (s == "s8") return qsp::quant_scheme::s8;
    throw py::value_error("scheme must be 'f32' or 's8', got '" + s + "'");
}

qsp::csr_pattern pattern_from(int64_t rows, int64_t cols, const py::array &row_ptr,
                              const py::array &col_idx) {
    if (row_ptr.ndim() != 1) throw py::value_error("row_ptr must be 1-D");
    if (col_idx.ndim() != 1) throw py::value_error("col_idx must be 1-D");
    const auto *rp = checked<int64_t>(row_ptr, "row_ptr", {row_ptr.shape(0)}, false);
    const auto *ci = checked<int32_t>(col_idx, "col_idx", {col_idx.shape(0)}, false);
    return qsp::csr_pattern::from_indices(rows, cols,
                                          std::vector<int64_t>(rp, rp + row_ptr.shape(0)),
                                          std::vector<int32_t>(ci, ci + col_idx.shape(0)));
}

// Shared by Linear and Conv2d: the layer's pattern, its primitives per input
// shape and thread count, and the execution of the three directions.
template <typename fwd_t, typename bwd_data_t, typename bwd_weights_t> class sparse_layer {
public:
    sparse_layer(qsp::csr_pattern pattern, qsp::quant_scheme scheme, bool with_bias)
        : pattern_(std::move(pattern)), scheme_(scheme), with_bias_(with_bias),
          engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {}

    int64_t nnz() const { return pattern_.nnz(); }
    const qsp::csr_pattern &pattern() const { return pattern_; }

    // Whether row_ptr / col_idx hold exactly this kernel's pattern (the ops
    // ask on every call: a pattern edited in place must not run on a kernel
    // built for the old one). A memcmp; any dtype or size mismatch is false.
    bool same_pattern(const py::array &row_ptr, const py::array &col_idx) const {
        if (row_ptr.ndim() != 1 || col_idx.ndim() != 1
            || !py::isinstance<py::array_t<int64_t>>(row_ptr)
            || !py::isinstance<py::array_t<int32_t>>(col_idx)
            || row_ptr.shape(0) != pattern_.rows() + 1 || col_idx.shape(0) != pattern_.nnz()
            || !(row_ptr.flags() & py::array::c_style) || !(col_idx.flags() & py::array::c_style))
            return false;
        return std::memcmp(row_ptr.data(), pattern_.row_ptr(),
                           sizeof(int64_t) * static_cast<size_t>(pattern_.rows() + 1))
                       == 0
               && std::memcmp(col_idx.data(), pattern_.col_idx(),
                              sizeof(int32_t) * static_cast<size_t>(pattern_.nnz()))
                          == 0;
    }
    std::string scheme() const { return qsp::to_string(scheme_); }

    // Which memory layouts a set of primitives was made for (Linear inside
    // a fused block: the activation between two layers in the kept layout).
    enum variant_bits : int {
        plain = 0,
        src_kept = 1, // src / diff_src in qsp::kept_layout_desc
        dst_kept = 2, // dst / diff_dst
    };

    // One shape's backward primitives, made on its first backward
    // (backward_of): an evaluation at a batch size that training never ran
    // builds and tunes none of them (two thirds of a new shape's tuning).
    struct backward_primitives {
        bwd_data_t bwd_data;
        bwd_weights_t bwd_weights;
        qsp::sparse_backward<bwd_data_t, bwd_weights_t> both; // one call for a training step
        std::array<std::string, 2> names;                     // impl_info_str() of each
        bool takes_kept; // both directions' implementations read the kept layout themselves
    };

    // One shape's primitives (and what the fused blocks ask of them).
    struct primitives {
        typename fwd_t::primitive_desc fwd_pd;
        fwd_t fwd;
        dims src, dst;
        int variant;
        qsp::primitive_attr attr; // as the forward was made: the backward is made alike
        // The backward's implementations where they are given (forced for a
        // test, or a larger team's: see get()); "": picked. from_team: a
        // larger team's, which may refuse this team size (then picked).
        std::array<std::string, 2> backward_as;
        bool from_team;
        mutable std::shared_ptr<const backward_primitives> bwd; // under the layer's mutex
        // The forward with a first batch_statistics post-op (the BatchNorm
        // after a Conv2d takes its statistics from it), made on first use
        // under the layer's mutex.
        mutable std::shared_ptr<const fwd_t> fwd_statistics;
    };

protected:
    // Conv2d: which vectorization the JIT may use (any: the tuner decides).
    qsp::conv_vectorization vectorization_ = qsp::conv_vectorization::any;

    struct entry {
        dims src;
        int threads;
        int variant;
        std::shared_ptr<const primitives> prims;
    };

    // Primitives of the most recent input shapes of this layer: a training
    // loop needs one or two (the last batch of an epoch is smaller), and
    // each entry holds three primitives, so a few are plenty.
    static constexpr size_t shapes_kept = 8;

    template <typename make_fwd_pd>
    std::shared_ptr<const primitives> get(const dims &src, const dims &dst, int threads,
                                          make_fwd_pd make, int variant = plain) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto it = cache_.begin(); it != cache_.end(); ++it)
            if (it->src == src && it->variant == variant && it->threads == threads) {
                cache_.splice(cache_.begin(), cache_, it);
                return cache_.front().prims;
            }
        const primitives *larger_team = largest_team_above(src, variant, threads, false);
        qsp::primitive_attr attr;
        attr.num_threads = threads;
        attr.vectorization = vectorization_; // backward descriptors follow the forward hint
        // Each descriptor measures where implementations compete while it is
        // created (attr.tune) and carries the winner: built once.
        attr.tune = tuning_enabled();
        if (larger_team) {
            std::array<std::string, 3> names{larger_team->fwd_pd.impl_info_str(), "", ""};
            if (larger_team->bwd) // (else: the backward looks for it again when it is made)
                names[1] = larger_team->bwd->names[0], names[2] = larger_team->bwd->names[1];
            // This shape ran on a larger team (one thread now while other
            // processes keep every core busy, or torch.set_num_threads): its
            // implementations again, not this team's tuned ones. Each
            // implementation's sums do not depend on the team size; two
            // implementations' f32 sums differ in rounding, so a load-driven
            // switch would make a run's results depend on the machine's load.
            // A larger team than any before is tuned for: a run that started
            // on a busy machine does not keep one thread's picks.
            try {
                return build(src, dst, make, variant, attr, &names, true);
            } catch (const std::exception &) {
                // an implementation refusing this team size: pick afresh
            }
        }
        const auto &forced = implementations_forced_for_testing();
        bool any_forced = false;
        for (const auto &name : forced)
            any_forced = any_forced || !name.empty();
        return build(src, dst, make, variant, attr, any_forced ? &forced : nullptr, false);
    }

    // The primitives of the largest team above `threads` that ran this
    // shape (with_backward: its backward too), or null; under the mutex.
    const primitives *largest_team_above(const dims &src, int variant, int threads,
                                         bool with_backward) const {
        const primitives *found = nullptr;
        int larger = threads;
        for (const entry &e : cache_)
            if (e.src == src && e.variant == variant && e.threads > larger
                && (!with_backward || e.prims->bwd))
                larger = e.threads, found = e.prims.get();
        return found;
    }

    struct layouts {
        dnnl::memory::desc src, dst, bias;
    };
    layouts layouts_of(const dims &src, const dims &dst, int variant) const {
        // (only Linear asks for kept layouts: its tensors are 2-D)
        return {variant & src_kept ? qsp::kept_layout_desc(src[0], src[1]) : f32_md(src),
                variant & dst_kept ? qsp::kept_layout_desc(dst[0], dst[1]) : f32_md(dst),
                with_bias_ ? f32_md({dst[1]}) : dnnl::memory::desc()};
    }

    // The forward of a shape; its backward waits for backward_of.
    template <typename make_fwd_pd>
    std::shared_ptr<const primitives> build(const dims &src, const dims &dst, make_fwd_pd make,
                                            int variant, const qsp::primitive_attr &attr,
                                            const std::array<std::string, 3> *same_as,
                                            bool from_team) {
        const layouts l = layouts_of(src, dst, variant);
        qsp::primitive_attr fwd_attr = attr;
        if (same_as) fwd_attr.implementation = (*same_as)[0];
        const typename fwd_t::primitive_desc fwd_pd = make(engine_, l.src, l.bias, l.dst, fwd_attr);
        std::array<std::string, 2> backward_as;
        if (same_as) backward_as = {(*same_as)[1], (*same_as)[2]};
        auto p = std::make_shared<const primitives>(primitives{fwd_pd, fwd_t(fwd_pd), src, dst,
                                                               variant, attr, backward_as,
                                                               from_team, nullptr, nullptr});
        cache_.push_front(entry{src, attr.num_threads, variant, p});
        if (cache_.size() > shapes_kept) cache_.pop_back();
        return p;
    }

    // p's backward primitives, made now (under the layer's mutex) with the
    // implementations given to p, else those of a larger team that ran
    // this shape's backward (get() says why), else picked and tuned.
    std::shared_ptr<const backward_primitives> build_backward(const primitives &p) const {
        std::array<std::string, 2> as = p.backward_as;
        bool from_team = p.from_team;
        if (as[0].empty() && as[1].empty())
            if (const primitives *team =
                        largest_team_above(p.src, p.variant, p.attr.num_threads, true))
                as = team->bwd->names, from_team = true;
        const layouts l = layouts_of(p.src, p.dst, p.variant);
        const auto make = [&](const std::array<std::string, 2> &names) {
            qsp::primitive_attr a = p.attr;
            a.implementation = names[0];
            const typename bwd_data_t::primitive_desc bd_pd(engine_, l.src, pattern_, l.dst,
                                                            p.fwd_pd, a);
            a.implementation = names[1];
            const typename bwd_weights_t::primitive_desc bw_pd(engine_, l.src, pattern_, l.bias,
                                                               l.dst, p.fwd_pd, a);
            return std::make_shared<const backward_primitives>(backward_primitives{
                    bwd_data_t(bd_pd),
                    bwd_weights_t(bw_pd),
                    qsp::sparse_backward<bwd_data_t, bwd_weights_t>(bd_pd, bw_pd),
                    {bd_pd.impl_info_str(), bw_pd.impl_info_str()},
                    bd_pd.takes_kept_layout() && bw_pd.takes_kept_layout()});
        };
        if (!from_team) return make(as);
        try {
            return make(as);
        } catch (const std::exception &) {
            return make({}); // a larger team's implementation refusing this team size
        }
    }

public:
    const backward_primitives &backward_of(const primitives &p) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!p.bwd) p.bwd = build_backward(p);
        return *p.bwd;
    }
    // "<forward>/<backward-data>/<backward-weights>" (the backward made if
    // it was not yet)
    std::string impls(const primitives &p) {
        const backward_primitives &b = backward_of(p);
        return p.fwd_pd.impl_info_str() + "/" + b.names[0] + "/" + b.names[1];
    }
    // Whether the forward's implementation reads the kept layout itself (a
    // forward with no backward to follow asks this alone).
    static bool forward_takes_kept(const primitives &p) { return p.fwd_pd.takes_kept_layout(); }
    // Whether every direction's does.
    bool takes_kept(const primitives &p) {
        return forward_takes_kept(p) && backward_of(p).takes_kept;
    }

protected:
    static bool tuning_enabled() {
        const char *env = std::getenv("QSP_TUNE");
        return !(env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "off") == 0));
    }

public:
    const dnnl::stream &stream() const { return stream_; }

protected:
    dnnl::memory mem(const dnnl::memory::desc &md, const void *p) const {
        return dnnl::memory(md, engine_, const_cast<void *>(p));
    }

    dnnl::memory seed_mem(int32_t *storage, uint64_t seed) const {
        storage[0] = static_cast<int32_t>(static_cast<uint32_t>(seed));
        storage[1] = static_cast<int32_t>(static_cast<uint32_t>(seed >> 32));
        return dnnl::memory(qsp::rounding_seed_desc(), engine_, storage);
    }

    size_t workspace_bytes_of(const primitives &p) const {
        return p.fwd_pd.workspace_desc().get_size();
    }

    // Allocates the output and the workspace (s8 training: the quantized
    // input, else empty) and runs the forward: one call from Python.
    // x_abs_max: None, or max |x| (one float) as x's writer found it: s8
    // skips its own pass finding it. with_statistics: the forward to run
    // instead, with its batch_statistics post-op; the tuple then ends with
    // dst's statistics, 4 x C floats: mean, biased variance, then (lowest,
    // highest) per channel.
    // quantized_src (instead of x): writes the forward's int8 src into the
    // workspace itself and sets its arguments (QSP_ARG_SRC_S8, _SCALE).
    using src_writer = std::function<void(qsp::exec_args &args, uint8_t *workspace)>;
    py::tuple forward(const primitives &p, const py::object &x, const py::array &values,
                      const py::object &bias, const py::object &x_abs_max,
                      const fwd_t *with_statistics = nullptr,
                      const src_writer *quantized_src = nullptr) {
        py::array_t<float> y = pooled_array<float>(p.dst);
        py::array_t<uint8_t> workspace;
        qsp::exec_args args{{DNNL_ARG_DST, mem(f32_md(p.dst), y.mutable_data())}};
        if (!quantized_src)
            args[DNNL_ARG_SRC] =
                    mem(f32_md(p.src), checked<float>(x.cast<py::array>(), "x", p.src, false));
        add_forward_args(p, args, values, bias, workspace);
        if (quantized_src) (*quantized_src)(args, workspace.mutable_data());
        if (const float *m = optional_f32(x_abs_max, "x_abs_max", {1});
            m && scheme_ == qsp::quant_scheme::s8)
            args[qsp::QSP_ARG_SRC_ABS_MAX] = mem(f32_md({1}), const_cast<float *>(m));
        const int64_t c = p.dst[1];
        py::array_t<float> statistics(with_statistics ? 4 * c : 0);
        if (with_statistics) {
            float *s = statistics.mutable_data();
            args[qsp::QSP_ARG_POST_OP(0, qsp::QSP_POST_OP_MEAN)] = mem(f32_md({c}), s);
            args[qsp::QSP_ARG_POST_OP(0, qsp::QSP_POST_OP_VARIANCE)] = mem(f32_md({c}), s + c);
            args[qsp::QSP_ARG_POST_OP(0, qsp::QSP_POST_OP_RANGE)] = mem(f32_md({c, 2}), s + 2 * c);
        }
        {
            py::gil_scoped_release release;
            (with_statistics ? *with_statistics : p.fwd).execute(stream_, args);
        }
        if (with_statistics) return py::make_tuple(y, workspace, statistics);
        return py::make_tuple(y, workspace);
    }

    // p's forward with a first batch_statistics post-op, on the
    // implementation p's forward picked (its workspace is the one p's
    // backward primitives read).
    template <typename make_fwd_pd>
    const fwd_t &forward_with_statistics(const primitives &p, int threads, make_fwd_pd make) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!p.fwd_statistics) {
            qsp::primitive_attr attr;
            attr.num_threads = threads;
            attr.vectorization = vectorization_;
            attr.implementation = p.fwd_pd.impl_info_str();
            attr.ops.append_batch_statistics();
            const auto bias_md = with_bias_ ? f32_md({p.dst[1]}) : dnnl::memory::desc();
            p.fwd_statistics = std::make_shared<const fwd_t>(
                    make(engine_, f32_md(p.src), bias_md, f32_md(p.dst), attr));
        }
        return *p.fwd_statistics;
    }

public:
    // A forward execution's arguments beyond src and dst (whose layouts the
    // caller picks): the values, the bias (dst's channels), the workspace
    // (allocated here, from the pool, when the scheme has one).
    void add_forward_args(const primitives &p, qsp::exec_args &args, const py::array &values,
                          const py::object &bias, py::array_t<uint8_t> &workspace) const {
        args[DNNL_ARG_WEIGHTS] =
                mem(f32_md({nnz()}), checked<float>(values, "values", {nnz()}, false));
        if (with_bias_) {
            if (bias.is_none())
                throw py::value_error("bias is required: the layer was created with a bias");
            args[DNNL_ARG_BIAS] =
                    mem(f32_md({p.dst[1]}),
                        checked<float>(bias.cast<py::array>(), "bias", {p.dst[1]}, false));
        }
        const auto ws_md = p.fwd_pd.workspace_desc();
        workspace = pooled_array<uint8_t>({static_cast<int64_t>(ws_md.get_size())});
        if (!ws_md.is_zero()) args[DNNL_ARG_WORKSPACE] = mem(ws_md, workspace.mutable_data());
    }

protected:
    // The forward's workspace (s8: the quantized input and weights both
    // backward directions read), checked against the descriptor's size.
    dnnl::memory workspace_mem(const primitives &p, const py::object &workspace) const {
        if (workspace.is_none())
            throw py::value_error("workspace (from forward) is required for s8");
        const auto ws_md = p.fwd_pd.workspace_desc();
        const int64_t bytes = static_cast<int64_t>(ws_md.get_size());
        return mem(ws_md,
                   checked<uint8_t>(workspace.cast<py::array>(), "workspace", {bytes}, false));
    }

    // backward-data's arguments (the weights for f32, the forward's
    // workspace for s8); dx allocated from the pool.
    qsp::exec_args data_args(const primitives &p, const py::array &dy, const py::array &values,
                             const py::object &workspace, py::array_t<float> &dx,
                             int32_t *seed_storage, uint64_t seed) const {
        qsp::exec_args args{{DNNL_ARG_DIFF_DST,
                             mem(f32_md(p.dst), checked<float>(dy, "grad_out", p.dst, false))},
                            {DNNL_ARG_DIFF_SRC, mem(f32_md(p.src), dx.mutable_data())},
                            {qsp::QSP_ARG_ROUNDING_SEED, seed_mem(seed_storage, seed)}};
        if (scheme_ == qsp::quant_scheme::s8)
            args[DNNL_ARG_WORKSPACE] = workspace_mem(p, workspace);
        else
            args[DNNL_ARG_WEIGHTS] =
                    mem(f32_md({nnz()}), checked<float>(values, "values", {nnz()}, false));
        return args;
    }

    py::array backward_data(const primitives &p, const py::object &workspace, const py::array &dy,
                            const py::array &values, uint64_t seed) {
        py::array_t<float> dx = pooled_array<float>(p.src);
        int32_t seed_storage[2];
        const qsp::exec_args args = data_args(p, dy, values, workspace, dx, seed_storage, seed);
        const backward_primitives &b = backward_of(p);
        {
            py::gil_scoped_release release;
            b.bwd_data.execute(stream_, args);
        }
        return dx;
    }

    // Both directions in one call (the fused primitive): returns dx.
    // dy_channel_abs_max (None, or max |dy| per output channel as its
    // writer found it: s8 skips its own pass finding the maxima).
    py::array backward(const primitives &p, const py::object &x, const py::object &workspace,
                       const py::array &dy, const py::array &values, py::array &dvalues,
                       const py::object &dbias, uint64_t seed,
                       const py::object &dy_channel_abs_max) {
        py::array_t<float> dx = pooled_array<float>(p.src);
        int32_t seed_storage[2];
        qsp::exec_args args = weights_args(p, x, workspace, dy, dvalues, dbias, seed_storage, seed,
                                           dy_channel_abs_max);
        for (auto &kv : data_args(p, dy, values, workspace, dx, seed_storage, seed))
            args.insert(kv);
        const backward_primitives &b = backward_of(p);
        {
            py::gil_scoped_release release;
            b.both.execute(stream_, args);
        }
        return dx;
    }

    // backward-weights' arguments (x for f32, the workspace for s8; s8
    // also dy_channel_abs_max where given).
    qsp::exec_args weights_args(const primitives &p, const py::object &x,
                                const py::object &workspace, const py::array &dy,
                                py::array &dvalues, const py::object &dbias, int32_t *seed_storage,
                                uint64_t seed, const py::object &dy_channel_abs_max) const {
        qsp::exec_args args{
                {DNNL_ARG_DIFF_DST,
                 mem(f32_md(p.dst), checked<float>(dy, "grad_out", p.dst, false))},
                {DNNL_ARG_DIFF_WEIGHTS,
                 mem(f32_md({nnz()}), checked<float>(dvalues, "grad_values", {nnz()}, true))},
                {qsp::QSP_ARG_ROUNDING_SEED, seed_mem(seed_storage, seed)}};
        if (scheme_ == qsp::quant_scheme::s8) {
            args[DNNL_ARG_WORKSPACE] = workspace_mem(p, workspace);
        } else {
            if (x.is_none()) throw py::value_error("x is required for f32 backward_weights");
            args[DNNL_ARG_SRC] =
                    mem(f32_md(p.src), checked<float>(x.cast<py::array>(), "x", p.src, false));
        }
        if (with_bias_) {
            if (dbias.is_none())
                throw py::value_error("grad_bias is required: the layer has a bias");
            args[DNNL_ARG_DIFF_BIAS] =
                    mem(f32_md({p.dst[1]}),
                        checked<float>(dbias.cast<py::array>(), "grad_bias", {p.dst[1]}, true));
        }
        if (const float *m = optional_f32(dy_channel_abs_max, "dy_channel_abs_max", {p.dst[1]});
            m && scheme_ == qsp::quant_scheme::s8)
            args[qsp::QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX] =
                    mem(f32_md({p.dst[1]}), const_cast<float *>(m));
        return args;
    }

    // dy_channel_abs_max (s8, or None): max |dy| per channel where dy's
    // writer found them, as in backward.
    void backward_weights(const primitives &p, const py::object &x, const py::object &workspace,
                          const py::array &dy, py::array &dvalues, const py::object &dbias,
                          uint64_t seed, const py::object &dy_channel_abs_max) {
        int32_t seed_storage[2];
        const qsp::exec_args args = weights_args(p, x, workspace, dy, dvalues, dbias, seed_storage,
                                                 seed, dy_channel_abs_max);
        const backward_primitives &b = backward_of(p);
        py::gil_scoped_release release;
        b.bwd_weights.execute(stream_, args);
    }

    qsp::csr_pattern pattern_;
    qsp::quant_scheme scheme_;
    bool with_bias_;
    dnnl::engine engine_;
    dnnl::stream stream_;
    std::mutex mutex_;
    std::list<entry> cache_; // most recent first
};

class linear_layer
    : public sparse_layer<qsp::sparse_linear_forward, qsp::sparse_linear_backward_data,
                          qsp::sparse_linear_backward_weights> {
public:
    linear_layer(int64_t in, int64_t out, const py::array &row_ptr, const py::array &col_idx,
                 const std::string &scheme, bool with_bias)
        : sparse_layer(pattern_from(out, in, row_ptr, col_idx), scheme_from(scheme), with_bias),
          in_(in), out_(out) {}

    std::shared_ptr<const primitives> prims(int64_t batch, int threads, int variant = plain) {
        return get(
                {batch, in_}, {batch, out_}, threads,
                [&](const dnnl::engine &e, const dnnl::memory::desc &s, const dnnl::memory::desc &b,
                    const dnnl::memory::desc &d, const qsp::primitive_attr &a) {
                    return qsp::sparse_linear_forward::primitive_desc(
                            e, qsp::prop_kind::forward_training, s, pattern_, b, d, scheme_, a);
                },
                variant);
    }

    int64_t in_features() const { return in_; }
    int64_t out_features() const { return out_; }

    // A backward execution's arguments beyond diff_dst and diff_src: the
    // values or the workspace, src (f32), the parameter gradients, the seed.
    void add_backward_args(const primitives &p, qsp::exec_args &args, const py::object &src,
                           const dnnl::memory::desc &src_md, const py::object &workspace,
                           const py::array &values, py::array_t<float> &dvalues,
                           py::array_t<float> &dbias, int32_t *seed_storage, uint64_t seed) {
        dvalues = py::array_t<float>(nnz());
        dbias = py::array_t<float>(with_bias_ ? out_ : 0);
        args[DNNL_ARG_DIFF_WEIGHTS] = mem(f32_md({nnz()}), dvalues.mutable_data());
        if (with_bias_) args[DNNL_ARG_DIFF_BIAS] = mem(f32_md({out_}), dbias.mutable_data());
        args[qsp::QSP_ARG_ROUNDING_SEED] = seed_mem(seed_storage, seed);
        if (scheme_ == qsp::quant_scheme::s8) {
            args[DNNL_ARG_WORKSPACE] = workspace_mem(p, workspace);
            return;
        }
        args[DNNL_ARG_WEIGHTS] =
                mem(f32_md({nnz()}), checked<float>(values, "values", {nnz()}, false));
        if (src.is_none()) throw py::value_error("src is required for f32 backward_weights");
        const int64_t n = static_cast<int64_t>(src_md.get_size() / sizeof(float));
        const py::array a = as_array(src, "src");
        args[DNNL_ARG_SRC] =
                mem(src_md, checked<float>(a, "src", a.ndim() == 1 ? dims{n} : p.src, false));
    }

    size_t workspace_bytes(int64_t batch, int threads) {
        return workspace_bytes_of(*prims(batch, threads));
    }
    std::string implementations(int64_t batch, int threads) {
        return impls(*prims(batch, threads));
    }

    py::tuple fwd(const py::array &x, const py::array &values, const py::object &bias, int threads,
                  const py::object &x_abs_max) {
        return forward(*prims(batch_of(x), threads), x, values, bias, x_abs_max);
    }
    py::array bwd_data(const py::object &ws, const py::array &dy, const py::array &values,
                       uint64_t seed, int threads) {
        return backward_data(*prims(batch_of(dy), threads), ws, dy, values, seed);
    }
    void bwd_weights(const py::object &x, const py::object &ws, const py::array &dy, py::array &dv,
                     const py::object &db, uint64_t seed, int threads,
                     const py::object &dy_channel_abs_max) {
        backward_weights(*prims(batch_of(dy), threads), x, ws, dy, dv, db, seed,
                         dy_channel_abs_max);
    }
    py::array bwd(const py::object &x, const py::object &ws, const py::array &dy,
                  const py::array &values, py::array &dv, const py::object &db, uint64_t seed,
                  int threads, const py::object &dy_channel_abs_max) {
        return backward(*prims(batch_of(dy), threads), x, ws, dy, values, dv, db, seed,
                        dy_channel_abs_max);
    }

private:
    static int64_t batch_of(const py::array &a) {
        if (a.ndim() != 2)
            throw py::value_error("expected a 2-D array (batch x features), got "
                                  + std::to_string(a.ndim()) + "-D");
        return a.shape(0);
    }
    int64_t in_, out_;
};

// The transformer MLP block (Linear -> activation -> Linear) with its hidden
// activation and that activation's gradient in the kept layout
// (qsp::kept_layout_desc) from the first layer's kernels to the second's and
// back, where both layers read it natively: the passes between the two
// layers are gone. With a ReLU (one bit per element kept; its pass also
// finds the maximum an s8 second layer would read the hidden tensor once
// more for) forward and backward are one call each; another activation
// (GELU) runs between the steps below, elementwise, on the hidden tensor in
// whatever layout it is (its padding stays zero: the activation of 0 is 0).
class linear_act_linear {
public:
    linear_act_linear(linear_layer &first, linear_layer &second) : a_(first), b_(second) {
        if (a_.out_features() != b_.in_features())
            throw py::value_error("the second layer's in_features ("
                                  + std::to_string(b_.in_features())
                                  + ") must be the first's out_features ("
                                  + std::to_string(a_.out_features()) + ")");
    }

    // y = second(relu(first(x))); returns (y, hidden, mask, workspace of
    // the first, workspace of the second): hidden (the ReLU's output, flat,
    // in the layout the block picked) is what an f32 second layer's backward
    // reads, mask its ReLU's bits. need_backward false (no gradient will be
    // asked: torch.no_grad, nothing requiring one): the layout is picked by
    // the forwards alone, and no backward primitive is made.
    py::tuple forward(const py::array &x, const py::array &values_a, const py::object &bias_a,
                      const py::array &values_b, const py::object &bias_b, int threads,
                      bool need_backward) {
        const auto p = pick(batch_of(x, "x", a_.in_features()), threads, need_backward);
        py::array_t<float> hidden = pooled_array<float>({p.hidden_n});
        py::array_t<uint8_t> mask = pooled_array<uint8_t>({(p.hidden_n + 7) / 8});
        py::array_t<uint8_t> ws_a, ws_b;
        const qsp::exec_args fa = first_forward_args(p, x, values_a, bias_a, hidden, ws_a);
        py::array_t<float> y = pooled_array<float>({p.batch, b_.out_features()});
        qsp::exec_args fb = second_forward_args(p, hidden, values_b, bias_b, y, ws_b);
        float hidden_abs_max = 0.f;
        if (b_.scheme() == "s8")
            fb[qsp::QSP_ARG_SRC_ABS_MAX] = mem(qsp::src_abs_max_desc(), &hidden_abs_max);
        {
            py::gil_scoped_release release;
            p.a->fwd.execute(a_.stream(), fa);
            qsp::relu_with_mask_forward(hidden.data(), hidden.mutable_data(), mask.mutable_data(),
                                        p.hidden_n, &hidden_abs_max, threads);
            p.b->fwd.execute(b_.stream(), fb);
        }
        return py::make_tuple(y, hidden, mask, ws_a, ws_b);
    }

    // The gradients: (dx or an empty array, dvalues_a, dbias_a, dvalues_b,
    // dbias_b) from dy and what forward returned (x and hidden: f32 layers;
    // the workspaces: s8).
    py::tuple backward(const py::array &dy, const py::object &x, const py::object &hidden,
                       const py::array &mask, const py::object &ws_a, const py::object &ws_b,
                       const py::array &values_a, const py::array &values_b, uint64_t seed_a,
                       uint64_t seed_b, bool need_dx, int threads) {
        const auto p = pick(batch_of(dy, "dy", b_.out_features()), threads);
        const uint8_t *bits = checked<uint8_t>(mask, "mask", {(p.hidden_n + 7) / 8}, false);
        py::array_t<float> dhidden = pooled_array<float>({p.hidden_n});
        py::array_t<float> dx, dv_a, db_a, dv_b, db_b;
        int32_t seed_storage_a[2], seed_storage_b[2];
        const qsp::exec_args bb = second_backward_args(p, dy, hidden, ws_b, values_b, dhidden, dv_b,
                                                       db_b, seed_storage_b, seed_b);
        const qsp::exec_args ba = first_backward_args(p, dhidden, x, ws_a, values_a, need_dx, dx,
                                                      dv_a, db_a, seed_storage_a, seed_a);
        const auto &backward_a = a_.backward_of(*p.a);
        const auto &backward_b = b_.backward_of(*p.b);
        {
            py::gil_scoped_release release;
            backward_b.both.execute(b_.stream(), bb);
            qsp::relu_with_mask_backward(dhidden.data(), bits, dhidden.mutable_data(), p.hidden_n,
                                         threads);
            run_first_backward(backward_a, ba, need_dx);
        }
        return py::make_tuple(dx, dv_a, db_a, dv_b, db_b);
    }

    // The steps, for an activation applied between them. first_forward:
    // (hidden before the activation, flat, the block's layout; workspace).
    py::tuple first_forward(const py::array &x, const py::array &values_a, const py::object &bias_a,
                            int threads, bool need_backward) {
        const auto p = pick(batch_of(x, "x", a_.in_features()), threads, need_backward);
        py::array_t<float> hidden = pooled_array<float>({p.hidden_n});
        py::array_t<uint8_t> ws_a;
        const qsp::exec_args fa = first_forward_args(p, x, values_a, bias_a, hidden, ws_a);
        {
            py::gil_scoped_release release;
            p.a->fwd.execute(a_.stream(), fa);
        }
        return py::make_tuple(hidden, ws_a);
    }

    // second_forward: (y, workspace) from the activation's output.
    py::tuple second_forward(const py::array &hidden, const py::array &values_b,
                             const py::object &bias_b, int64_t batch, int threads,
                             bool need_backward) {
        const auto p = pick(batch, threads, need_backward);
        py::array_t<float> y = pooled_array<float>({p.batch, b_.out_features()});
        py::array_t<uint8_t> ws_b;
        const qsp::exec_args fb = second_forward_args(p, hidden, values_b, bias_b, y, ws_b);
        {
            py::gil_scoped_release release;
            p.b->fwd.execute(b_.stream(), fb);
        }
        return py::make_tuple(y, ws_b);
    }

    // second_backward: (the activation output's gradient, flat, the block's
    // layout; dvalues_b; dbias_b).
    py::tuple second_backward(const py::array &dy, const py::object &hidden, const py::object &ws_b,
                              const py::array &values_b, uint64_t seed_b, int threads) {
        const auto p = pick(batch_of(dy, "dy", b_.out_features()), threads);
        py::array_t<float> dhidden = pooled_array<float>({p.hidden_n});
        py::array_t<float> dv_b, db_b;
        int32_t seed_storage[2];
        const qsp::exec_args bb = second_backward_args(p, dy, hidden, ws_b, values_b, dhidden, dv_b,
                                                       db_b, seed_storage, seed_b);
        const auto &backward_b = b_.backward_of(*p.b);
        {
            py::gil_scoped_release release;
            backward_b.both.execute(b_.stream(), bb);
        }
        return py::make_tuple(dhidden, dv_b, db_b);
    }

    // first_backward: (dx or an empty array, dvalues_a, dbias_a) from the
    // gradient of the activation's input.
    py::tuple first_backward(const py::array &dhidden, const py::object &x, const py::object &ws_a,
                             const py::array &values_a, uint64_t seed_a, bool need_dx,
                             int64_t batch, int threads) {
        const auto p = pick(batch, threads);
        py::array_t<float> dx, dv_a, db_a;
        int32_t seed_storage[2];
        const qsp::exec_args ba = first_backward_args(p, dhidden, x, ws_a, values_a, need_dx, dx,
                                                      dv_a, db_a, seed_storage, seed_a);
        const auto &backward_a = a_.backward_of(*p.a);
        {
            py::gil_scoped_release release;
            run_first_backward(backward_a, ba, need_dx);
        }
        return py::make_tuple(dx, dv_a, db_a);
    }

    // "<first's forward/backward-data/backward-weights> | <second's>", and
    // the hidden activation's layout.
    std::string implementations(int64_t batch, int threads) {
        const auto p = pick(batch, threads);
        return a_.impls(*p.a) + " | " + b_.impls(*p.b)
               + (p.hidden_md.get_ndims() == 3 ? " (hidden kept)" : " (hidden plain)");
    }

private:
    using prims_t = std::shared_ptr<const linear_layer::primitives>;
    struct picked {
        prims_t a, b;
        dnnl::memory::desc hidden_md;
        int64_t batch, hidden_n; // hidden_n: floats of the hidden tensor, padding included
    };

    // The two layers' primitives and the hidden activation's layout: kept
    // where every direction of both layers reads it natively, plain where
    // one would convert (the conversions would cost more than the layout
    // saves). A forward with no backward to follow asks its forwards only:
    // the layers' backward primitives are not made for it.
    picked pick(int64_t batch, int threads, bool need_backward = true) {
        auto pa = a_.prims(batch, threads, linear_layer::plain);
        auto pb = b_.prims(batch, threads, linear_layer::plain);
        const int64_t hidden = a_.out_features();
        dnnl::memory::desc md = f32_md({batch, hidden});
        const bool kept = need_backward ? a_.takes_kept(*pa) && b_.takes_kept(*pb)
                                        : a_.forward_takes_kept(*pa) && b_.forward_takes_kept(*pb);
        if (kept) {
            pa = a_.prims(batch, threads, linear_layer::dst_kept);
            pb = b_.prims(batch, threads, linear_layer::src_kept);
            md = qsp::kept_layout_desc(batch, hidden);
        }
        return {pa, pb, md, batch, static_cast<int64_t>(md.get_size() / sizeof(float))};
    }

    static int64_t batch_of(const py::array &a, const char *name, int64_t features) {
        if (a.ndim() != 2 || a.shape(1) != features)
            throw py::value_error(std::string(name) + " must be 2-D (batch x "
                                  + std::to_string(features) + "), got " + std::to_string(a.ndim())
                                  + "-D");
        return a.shape(0);
    }

    // A flat hidden tensor of the picked layout (or None where not needed).
    const float *hidden_of(const picked &p, const py::object &h, const char *name) const {
        return checked<float>(as_array(h, name), name, {p.hidden_n}, false);
    }

    qsp::exec_args first_forward_args(const picked &p, const py::array &x,
                                      const py::array &values_a, const py::object &bias_a,
                                      py::array_t<float> &hidden, py::array_t<uint8_t> &ws_a) {
        qsp::exec_args fa{
                {DNNL_ARG_SRC, mem(f32_md(p.a->src), checked<float>(x, "x", p.a->src, false))},
                {DNNL_ARG_DST, mem(p.hidden_md, hidden.mutable_data())}};
        a_.add_forward_args(*p.a, fa, values_a, bias_a, ws_a);
        return fa;
    }

    qsp::exec_args second_forward_args(const picked &p, const py::object &hidden,
                                       const py::array &values_b, const py::object &bias_b,
                                       py::array_t<float> &y, py::array_t<uint8_t> &ws_b) {
        qsp::exec_args fb{{DNNL_ARG_SRC, mem(p.hidden_md, hidden_of(p, hidden, "hidden"))},
                          {DNNL_ARG_DST, mem(f32_md(p.b->dst), y.mutable_data())}};
        b_.add_forward_args(*p.b, fb, values_b, bias_b, ws_b);
        return fb;
    }

    qsp::exec_args second_backward_args(const picked &p, const py::array &dy,
                                        const py::object &hidden, const py::object &ws_b,
                                        const py::array &values_b, py::array_t<float> &dhidden,
                                        py::array_t<float> &dv_b, py::array_t<float> &db_b,
                                        int32_t *seed_storage, uint64_t seed_b) {
        qsp::exec_args bb{{DNNL_ARG_DIFF_DST,
                           mem(f32_md(p.b->dst), checked<float>(dy, "dy", p.b->dst, false))},
                          {DNNL_ARG_DIFF_SRC, mem(p.hidden_md, dhidden.mutable_data())}};
        b_.add_backward_args(*p.b, bb, hidden, p.hidden_md, ws_b, values_b, dv_b, db_b,
                             seed_storage, seed_b);
        return bb;
    }

    qsp::exec_args first_backward_args(const picked &p, const py::object &dhidden,
                                       const py::object &x, const py::object &ws_a,
                                       const py::array &values_a, bool need_dx,
                                       py::array_t<float> &dx, py::array_t<float> &dv_a,
                                       py::array_t<float> &db_a, int32_t *seed_storage,
                                       uint64_t seed_a) {
        dx = pooled_array<float>(need_dx ? p.a->src : dims{0});
        qsp::exec_args ba{{DNNL_ARG_DIFF_DST, mem(p.hidden_md, hidden_of(p, dhidden, "dhidden"))}};
        if (need_dx) ba[DNNL_ARG_DIFF_SRC] = mem(f32_md(p.a->src), dx.mutable_data());
        a_.add_backward_args(*p.a, ba, x, f32_md(p.a->src), ws_a, values_a, dv_a, db_a,
                             seed_storage, seed_a);
        return ba;
    }

    void run_first_backward(const linear_layer::backward_primitives &backward_a,
                            const qsp::exec_args &ba, bool need_dx) const {
        if (need_dx)
            backward_a.both.execute(a_.stream(), ba);
        else
            backward_a.bwd_weights.execute(a_.stream(), ba);
    }

    dnnl::memory mem(const dnnl::memory::desc &md, const void *p) const {
        return dnnl::memory(md, engine_, const_cast<void *>(p));
    }

    linear_layer &a_, &b_;
    dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
};

class conv2d_layer
    : public sparse_layer<qsp::sparse_conv2d_forward, qsp::sparse_conv2d_backward_data,
                          qsp::sparse_conv2d_backward_weights> {
public:
    conv2d_layer(int64_t in_c, int64_t out_c, std::array<int64_t, 2> kernel,
                 std::array<int64_t, 2> stride, std::array<int64_t, 4> padding,
                 std::array<int64_t, 2> dilation, int64_t groups, const py::array &row_ptr,
                 const py::array &col_idx, const std::string &scheme, bool with_bias,
                 const std::string &vectorization)
        : sparse_layer(pattern_from(out_c,
                                    checked_columns(in_c, out_c, kernel, stride, padding, dilation,
                                                    groups),
                                    row_ptr, col_idx),
                       scheme_from(scheme), with_bias),
          in_c_(in_c), out_c_(out_c), g_(geometry(kernel, stride, padding, dilation, groups)) {
        if (vectorization == "any")
            vectorization_ = qsp::conv_vectorization::any;
        else if (vectorization == "batch")
            vectorization_ = qsp::conv_vectorization::batch;
        else if (vectorization == "output_width")
            vectorization_ = qsp::conv_vectorization::output_width;
        else
            throw py::value_error("vectorization must be 'any', 'batch' or 'output_width', got '"
                                  + vectorization + "'");
    }
    std::string vectorization() const { return qsp::to_string(vectorization_); }

    // Validates in C++ before anything is computed (a stride of 0 is a
    // ValueError, never a division by zero).
    std::array<int64_t, 2> output_hw(int64_t h, int64_t w) const {
        return qsp::conv2d_output_hw(g_, h, w);
    }

    auto make_forward_pd() const {
        return [this](const dnnl::engine &e, const dnnl::memory::desc &s,
                      const dnnl::memory::desc &b, const dnnl::memory::desc &d,
                      const qsp::primitive_attr &a) {
            return qsp::sparse_conv2d_forward::primitive_desc(e, qsp::prop_kind::forward_training,
                                                              s, pattern_, b, d, g_, scheme_, a);
        };
    }

    std::shared_ptr<const primitives> prims(const dims &src, int threads) {
        const auto o = output_hw(src[2], src[3]);
        return get(src, {src[0], out_c_, o[0], o[1]}, threads, make_forward_pd());
    }

    size_t workspace_bytes(const dims &src, int threads) {
        return workspace_bytes_of(*prims(src, threads));
    }
    std::string implementations(const dims &src, int threads) {
        return impls(*prims(src, threads));
    }

    // statistics: also dst's batch statistics (forward's with_statistics),
    // for the BatchNorm after the convolution.
    py::tuple fwd(const py::array &x, const py::array &values, const py::object &bias, int threads,
                  const py::object &x_abs_max, bool statistics) {
        const auto p = prims(shape4(x), threads);
        return forward(*p, x, values, bias, x_abs_max,
                       statistics ? &forward_with_statistics(*p, threads, make_forward_pd())
                                  : nullptr);
    }
    // The BatchNorm (+ ReLU, batch statistics, the int8 copy of its input
    // kept) over bn_src, the output of the convolution before this one,
    // then this s8 layer's forward of its result: the BatchNorm writes that
    // result only as this layer's int8 input, into the forward's workspace
    // (qsp::batch_norm_relu_forward_quantized), so the f32 activation
    // between the two convolutions never goes to memory. known: bn_src's
    // batch statistics (4 x C floats, the convolution's statistics=True).
    // Returns the forward's tuple (y, workspace[, statistics]) followed by
    // the BatchNorm's (mask, mean, invstd, batch_var, centered, step).
    py::tuple fwd_after_batch_norm(const py::array &bn_src, const py::object &gamma,
                                   const py::object &beta, double eps, const py::object &known,
                                   const py::array &values, const py::object &bias, int threads,
                                   bool statistics) {
        if (scheme_ != qsp::quant_scheme::s8)
            throw py::value_error("forward_after_batch_norm: the layer must be s8 (its int8 input "
                                  "is what the BatchNorm writes), got "
                                  + std::string(qsp::to_string(scheme_)));
        const qsp::batch_norm_relu_desc d = batch_norm_desc(bn_src, eps, true, true);
        const dims shape = shape4(bn_src), per_channel{d.channels};
        const float *src = checked<float>(bn_src, "bn_src", shape, false);
        const float *g = optional_f32(gamma, "gamma", per_channel);
        const float *b = optional_f32(beta, "beta", per_channel);
        qsp::batch_norm_known_statistics given;
        const qsp::batch_norm_known_statistics *kp = known_statistics(known, d.channels, given);
        const int64_t n = d.batch * d.channels * d.spatial;
        py::array_t<uint8_t> mask = pooled_array<uint8_t>({(n + 7) / 8});
        py::array_t<float> mean(d.channels), invstd(d.channels), batch_var(d.channels),
                step(d.channels);
        py::array_t<int8_t> centered = pooled_array<int8_t>(shape);
        float scale = 0.f;
        const auto p = prims(shape, threads);
        const auto q_md =
                dnnl::memory::desc(shape, dnnl::memory::data_type::s8, f32_md(shape).get_strides());
        const src_writer write = [&](qsp::exec_args &args, uint8_t *workspace) {
            auto *xq = reinterpret_cast<int8_t *>(workspace + p->fwd_pd.workspace_src_s8_offset());
            {
                py::gil_scoped_release nogil;
                qsp::batch_norm_relu_forward_quantized(
                        d, src, g, b, {xq, &scale}, mask.mutable_data(), mean.mutable_data(),
                        invstd.mutable_data(), batch_var.mutable_data(), centered.mutable_data(),
                        step.mutable_data(), threads, kp);
            }
            args[qsp::QSP_ARG_SRC_S8] = mem(q_md, xq);
            args[qsp::QSP_ARG_SRC_S8_SCALE] = mem(f32_md({1}), &scale);
        };
        const py::tuple out = forward(
                *p, py::none(), values, bias, py::none(),
                statistics ? &forward_with_statistics(*p, threads, make_forward_pd()) : nullptr,
                &write);
        return py::make_tuple(out, mask, mean, invstd, batch_var, centered, step);
    }
    py::array bwd_data(const py::object &ws, const py::array &dy, const py::array &values,
                       const dims &src, uint64_t seed, int threads) {
        if (src.size() != 4)
            throw py::value_error("input_shape must have 4 entries (N, C, H, W), got "
                                  + std::to_string(src.size()));
        return backward_data(*prims(src, threads), ws, dy, values, seed);
    }
    void bwd_weights(const py::object &x, const py::object &ws, const py::array &dy, py::array &dv,
                     const py::object &db, const dims &src, uint64_t seed, int threads,
                     const py::object &dy_channel_abs_max) {
        if (src.size() != 4)
            throw py::value_error("input_shape must have 4 entries (N, C, H, W), got "
                                  + std::to_string(src.size()));
        backward_weights(*prims(src, threads), x, ws, dy, dv, db, seed, dy_channel_abs_max);
    }
    py::array bwd(const py::object &x, const py::object &ws, const py::array &dy,
                  const py::array &values, py::array &dv, const py::object &db, const dims &src,
                  uint64_t seed, int threads, const py::object &dy_channel_abs_max) {
        if (src.size() != 4)
            throw py::value_error("input_shape must have 4 entries (N, C, H, W), got "
                                  + std::to_string(src.size()));
        return backward(*prims(src, threads), x, ws, dy, values, dv, db, seed, dy_channel_abs_max);
    }

    static qsp::conv2d_geometry geometry(std::array<int64_t, 2> kernel,
                                         std::array<int64_t, 2> stride,
                                         std::array<int64_t, 4> padding,
                                         std::array<int64_t, 2> dilation, int64_t groups) {
        qsp::conv2d_geometry g;
        g.kernel_h = kernel[0];
        g.kernel_w = kernel[1];
        g.stride_h = stride[0];
        g.stride_w = stride[1];
        g.pad_top = padding[0];
        g.pad_left = padding[1];
        g.pad_bottom = padding[2];
        g.pad_right = padding[3];
        g.dilation_h = dilation[0];
        g.dilation_w = dilation[1];
        g.groups = groups;
        return g;
    }

private:
    // The pattern's column count, computed only after every check passed.
    static int64_t checked_columns(int64_t in_c, int64_t out_c, std::array<int64_t, 2> kernel,
                                   std::array<int64_t, 2> stride, std::array<int64_t, 4> padding,
                                   std::array<int64_t, 2> dilation, int64_t groups) {
        if (in_c < 1)
            throw py::value_error("in_channels must be >= 1, got " + std::to_string(in_c));
        if (out_c < 1)
            throw py::value_error("out_channels must be >= 1, got " + std::to_string(out_c));
        const auto g = geometry(kernel, stride, padding, dilation, groups);
        qsp::check_conv2d_geometry(g, in_c, out_c); // std::invalid_argument -> ValueError
        return in_c / g.groups * g.kernel_h * g.kernel_w;
    }

    static dims shape4(const py::array &a) {
        if (a.ndim() != 4)
            throw py::value_error("expected a 4-D array (N x C x H x W), got "
                                  + std::to_string(a.ndim()) + "-D");
        return dims(a.shape(), a.shape() + 4);
    }
    int64_t in_c_, out_c_;
    qsp::conv2d_geometry g_;
};

py::tuple pattern_arrays(const qsp::csr_pattern &p) {
    py::array_t<int64_t> rp(p.rows() + 1);
    py::array_t<int32_t> ci(p.nnz());
    std::copy(p.row_ptr(), p.row_ptr() + p.rows() + 1, rp.mutable_data());
    std::copy(p.col_idx(), p.col_idx() + p.nnz(), ci.mutable_data());
    return py::make_tuple(rp, ci);
}

} // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "qsparseprop C++ core (primitives over numpy buffers)";
    m.def("version", &qsp::version);
    m.def("detected_cpu_isa", [] { return std::string(qsp::to_string(qsp::detected_cpu_isa())); });
    m.def("effective_cpu_isa",
          [] { return std::string(qsp::to_string(qsp::effective_cpu_isa())); });
    m.def("set_max_cpu_isa", [](const std::string &s) { qsp::set_max_cpu_isa(s); });
    m.def("avx_vnni_usable", &qsp::avx_vnni_usable);
    m.def("set_verbose", [](int level) { qsp::set_verbose_level(level); });
    m.def("verbose_level", &qsp::verbose_level);
    m.def("rounding_seed32", &qsp::rounding_seed32);
    m.def(
            "s8_workspace_bytes",
            [](int64_t src_elems, int64_t nnz, int64_t channels) {
                return qsp::detail::s8::workspace_layout(src_elems, nnz, channels).bytes;
            },
            py::arg("src_elems"), py::arg("nnz"), py::arg("channels"),
            "Bytes of an s8 training workspace (the forward's quantized input and weights).");
    m.def("max_num_threads", &qsp::max_num_threads,
          "the largest thread count a primitive accepts (4x the processors, at least 256)");

    m.def(
            "check_conv2d_geometry",
            [](std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
               std::array<int64_t, 4> padding, std::array<int64_t, 2> dilation, int64_t groups,
               int64_t in_channels, int64_t out_channels) {
                qsp::check_conv2d_geometry(
                        conv2d_layer::geometry(kernel, stride, padding, dilation, groups),
                        in_channels, out_channels);
            },
            py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
            py::arg("groups"), py::arg("in_channels"), py::arg("out_channels"));
    m.def("cache_info", [] {
        py::list out;
        for (const qsp::cache_info &c : qsp::cache_infos())
            out.append(py::dict(py::arg("name") = c.name, py::arg("size") = c.size,
                                py::arg("capacity") = c.capacity, py::arg("hits") = c.hits,
                                py::arg("misses") = c.misses,
                                py::arg("generations") = c.generations,
                                py::arg("evictions") = c.evictions, py::arg("bytes") = c.bytes,
                                py::arg("memory_limit") = c.memory_limit,
                                py::arg("in_use_elsewhere") = c.in_use_elsewhere));
        return out;
    });
    m.def("clear_caches", &qsp::clear_caches);
    m.def("set_cache_capacity", &qsp::set_cache_capacity, py::arg("entries"));
    m.def("set_cache_memory_limit", &qsp::set_cache_memory_limit, py::arg("bytes"));
    m.def("cache_memory_limit", &qsp::cache_memory_limit);
    m.def("clear_tuning_decisions", &qsp::clear_tuning_decisions);
    m.def("persistent_cache_status", [] {
        const qsp::persistent_cache_info i = qsp::persistent_cache_status();
        return py::dict(py::arg("enabled") = i.enabled, py::arg("dir") = i.dir,
                        py::arg("reason") = i.reason, py::arg("entries") = i.entries,
                        py::arg("bytes") = i.bytes, py::arg("max_bytes") = i.max_bytes);
    });
    m.def("set_persistent_cache_dir", &qsp::set_persistent_cache_dir, py::arg("dir"));
    m.def("clear_persistent_cache", &qsp::clear_persistent_cache);
    m.def("check_persistent_cache", [] {
        const qsp::persistent_cache_check c = qsp::check_persistent_cache();
        return py::dict(py::arg("valid") = c.valid, py::arg("removed") = c.removed,
                        py::arg("problems") = c.problems);
    });
    m.def(
            "persistent_cache_load",
            [](const std::string &kind, const py::bytes &key) -> py::object {
                auto v = qsp::persistent_cache_load(kind, key);
                if (!v) return py::none();
                return py::bytes(*v);
            },
            py::arg("kind"), py::arg("key"));
    m.def(
            "persistent_cache_store",
            [](const std::string &kind, const py::bytes &key, const py::bytes &payload) {
                qsp::persistent_cache_store(kind, key, payload);
            },
            py::arg("kind"), py::arg("key"), py::arg("payload"));
    m.def("scratch_info", [] {
        const qsp::scratch_info s = qsp::scratch_pool_info();
        return py::dict(
                py::arg("idle_bytes") = s.idle_bytes, py::arg("in_use_bytes") = s.in_use_bytes,
                py::arg("capacity_bytes") = s.capacity_bytes, py::arg("peak_bytes") = s.peak_bytes);
    });
    m.def("set_scratch_capacity", &qsp::set_scratch_capacity, py::arg("bytes"));
    m.def("release_scratch", &qsp::release_scratch);
    m.def("set_profiling", &qsp::set_profiling, py::arg("on"));
    m.def("profiling", &qsp::profiling);
    m.def("clear_profile", &qsp::clear_profile);
    m.def("profile_info", [] {
        py::list out;
        for (const auto &e : qsp::profile_info())
            out.append(py::dict(py::arg("direction") = e.direction, py::arg("calls") = e.calls,
                                py::arg("total_ms") = e.total_ms,
                                py::arg("kernel_ms") = e.kernel_ms));
        return out;
    });
    m.def(
            "_force_implementations_for_testing",
            [](const std::string &fwd, const std::string &bwd_data,
               const std::string &bwd_weights) {
                implementations_forced_for_testing() = {fwd, bwd_data, bwd_weights};
            },
            "Tests only: the implementations the next new shape of a layer is built with (empty: "
            "picked as usual).");
    m.def("_force_pattern_hash_for_testing", &qsp::detail::force_pattern_hash_for_testing,
          py::arg("on"), py::arg("value") = 0);

    m.def(
            "csr_from_dense",
            [](const py::array &dense, float threshold) {
                if (dense.ndim() != 2) throw py::value_error("dense must be 2-D");
                const auto *d =
                        checked<float>(dense, "dense", {dense.shape(0), dense.shape(1)}, false);
                return pattern_arrays(
                        qsp::csr_pattern::from_dense(d, dense.shape(0), dense.shape(1), threshold));
            },
            py::arg("dense"), py::arg("threshold") = 0.f);
    m.def("csr_from_mask", [](const py::array &mask) {
        if (mask.ndim() != 2) throw py::value_error("mask must be 2-D");
        const auto *d = checked<uint8_t>(mask, "mask", {mask.shape(0), mask.shape(1)}, false);
        return pattern_arrays(qsp::csr_pattern::from_mask(d, mask.shape(0), mask.shape(1)));
    });
    m.def("validate_csr", [](int64_t rows, int64_t cols, const py::array &rp, const py::array &ci) {
        return pattern_from(rows, cols, rp, ci).hash();
    });

    // 1-D views of the tensors (the Python side flattens them).
    m.def(
            "relu_with_mask_forward",
            [](const py::array &src, py::array &dst, py::array &mask, int threads) {
                const dims n{flat_length(src, "src")};
                const float *s = checked<float>(src, "src", n, false);
                float *d = checked<float>(dst, "dst", n, true);
                uint8_t *b = checked<uint8_t>(mask, "mask", {(n[0] + 7) / 8}, true);
                py::gil_scoped_release nogil;
                qsp::relu_with_mask_forward(s, d, b, n[0], threads);
            },
            py::arg("src"), py::arg("dst"), py::arg("mask"), py::arg("threads"));
    m.def(
            "relu_with_mask_backward",
            [](const py::array &diff_dst, const py::array &mask, py::array &diff_src, int threads) {
                const dims n{flat_length(diff_dst, "diff_dst")};
                const float *g = checked<float>(diff_dst, "diff_dst", n, false);
                const uint8_t *b = checked<uint8_t>(mask, "mask", {(n[0] + 7) / 8}, false);
                float *d = checked<float>(diff_src, "diff_src", n, true);
                py::gil_scoped_release nogil;
                qsp::relu_with_mask_backward(g, b, d, n[0], threads);
            },
            py::arg("diff_dst"), py::arg("mask"), py::arg("diff_src"), py::arg("threads"));

    // The pixels of a strided 1x1 convolution (src: N x C x H x W,
    // C-contiguous float32) and the spread of their gradient: outputs from
    // the pool, so a step's copies do not fault fresh pages in.
    m.def(
            "subsample_pixels",
            [](const py::array &src, int64_t sh, int64_t sw, int threads) {
                if (src.ndim() != 4)
                    throw py::value_error("src must be 4-D (N, C, H, W), got "
                                          + std::to_string(src.ndim()) + "-D");
                const dims shape(src.shape(), src.shape() + 4);
                const float *s = checked<float>(src, "src", shape, false);
                if (sh < 1 || sw < 1)
                    throw py::value_error("strides must be >= 1, got " + std::to_string(sh) + ", "
                                          + std::to_string(sw));
                py::array_t<float> dst = pooled_array<float>(
                        {shape[0], shape[1], (shape[2] + sh - 1) / sh, (shape[3] + sw - 1) / sw});
                float *d = dst.mutable_data();
                py::gil_scoped_release nogil;
                qsp::subsample_pixels_forward(s, shape[0], shape[1], shape[2], shape[3], sh, sw, d,
                                              threads);
                return dst;
            },
            py::arg("src"), py::arg("sh"), py::arg("sw"), py::arg("threads"));
    m.def(
            "subsample_pixels_backward",
            [](const py::array &diff_dst, int64_t h, int64_t w, int64_t sh, int64_t sw,
               int threads) {
                if (diff_dst.ndim() != 4)
                    throw py::value_error("diff_dst must be 4-D (N, C, H, W), got "
                                          + std::to_string(diff_dst.ndim()) + "-D");
                if (h < 1 || w < 1 || sh < 1 || sw < 1)
                    throw py::value_error("h, w and the strides must be >= 1, got "
                                          + std::to_string(h) + ", " + std::to_string(w) + ", "
                                          + std::to_string(sh) + ", " + std::to_string(sw));
                const int64_t n = diff_dst.shape(0), c = diff_dst.shape(1);
                const float *g = checked<float>(
                        diff_dst, "diff_dst", {n, c, (h + sh - 1) / sh, (w + sw - 1) / sw}, false);
                py::array_t<float> dx = pooled_array<float>({n, c, h, w});
                float *d = dx.mutable_data();
                py::gil_scoped_release nogil;
                qsp::subsample_pixels_backward(g, n, c, h, w, sh, sw, d, threads);
                return dx;
            },
            py::arg("diff_dst"), py::arg("h"), py::arg("w"), py::arg("sh"), py::arg("sw"),
            py::arg("threads"));
    // The spread added in place into diff_src (N x C x H x W), the input's
    // gradient from the other layer reading it.
    m.def(
            "subsample_pixels_backward_add",
            [](const py::array &diff_dst, py::array &diff_src, int64_t sh, int64_t sw,
               int threads) {
                if (diff_src.ndim() != 4 || diff_dst.ndim() != 4)
                    throw py::value_error("diff_dst and diff_src must be 4-D (N, C, H, W), got "
                                          + std::to_string(diff_dst.ndim()) + "-D and "
                                          + std::to_string(diff_src.ndim()) + "-D");
                if (sh < 1 || sw < 1)
                    throw py::value_error("strides must be >= 1, got " + std::to_string(sh) + ", "
                                          + std::to_string(sw));
                const dims shape(diff_src.shape(), diff_src.shape() + 4);
                float *d = checked<float>(diff_src, "diff_src", shape, true);
                const float *g = checked<float>(
                        diff_dst, "diff_dst",
                        {shape[0], shape[1], (shape[2] + sh - 1) / sh, (shape[3] + sw - 1) / sw},
                        false);
                py::gil_scoped_release nogil;
                qsp::subsample_pixels_backward_add(g, shape[0], shape[1], shape[2], shape[3], sh,
                                                   sw, d, threads);
            },
            py::arg("diff_dst"), py::arg("diff_src"), py::arg("sh"), py::arg("sw"),
            py::arg("threads"));

    // The BatchNorm2d (-ReLU) of a fused Conv2d block (qsparseprop.fuse):
    // src is the N x C x H x W contiguous output of the block's convolution;
    // residual (or None) a tensor of its shape added before the ReLU (a
    // residual block's end). Returns (dst, mask, mean, invstd, batch_var,
    // centered, step, max |dst| (keep_s8; else empty)).
    // known: None, or src's batch statistics as the convolution that wrote
    // it took them (4 x C floats: mean, variance, lowest and highest per
    // channel; conv2d_layer.forward(statistics=True)).
    m.def(
            "batch_norm_relu_forward",
            [](const py::array &src, const py::object &gamma, const py::object &beta,
               const py::object &running_mean, const py::object &running_var, double eps,
               bool batch_statistics, bool relu, bool keep_s8, const py::object &residual,
               int threads, const py::object &known) {
                const qsp::batch_norm_relu_desc d =
                        batch_norm_desc(src, eps, batch_statistics, relu);
                const dims shape(src.shape(), src.shape() + 4), per_channel{d.channels};
                const float *s = checked<float>(src, "src", shape, false);
                const float *g = optional_f32(gamma, "gamma", per_channel);
                const float *b = optional_f32(beta, "beta", per_channel);
                const float *rm = optional_f32(running_mean, "running_mean", per_channel);
                const float *rv = optional_f32(running_var, "running_var", per_channel);
                const float *res = optional_f32(residual, "residual", shape);
                qsp::batch_norm_known_statistics given;
                const qsp::batch_norm_known_statistics *kp =
                        known_statistics(known, d.channels, given);
                py::array_t<float> dst = pooled_array<float>(shape);
                const int64_t n = d.batch * d.channels * d.spatial;
                py::array_t<uint8_t> mask = pooled_array<uint8_t>({relu ? (n + 7) / 8 : 0});
                py::array_t<float> mean(d.channels), invstd(d.channels),
                        batch_var(batch_statistics ? d.channels : 0),
                        step(keep_s8 ? d.channels : 0);
                py::array_t<int8_t> centered = pooled_array<int8_t>(keep_s8 ? shape : dims{0});
                // an int8 block's dst feeds an s8 layer: its max |dst| too (from
                // the ranges, or found by the apply pass after a residual's add)
                py::array_t<float> dst_abs_max(keep_s8 ? 1 : 0);
                {
                    py::gil_scoped_release nogil;
                    float *bv = batch_statistics ? batch_var.mutable_data() : nullptr;
                    if (res && keep_s8)
                        qsp::batch_norm_add_relu_forward(
                                d, s, res, g, b, rm, rv, dst.mutable_data(), mask.mutable_data(),
                                mean.mutable_data(), invstd.mutable_data(), bv,
                                centered.mutable_data(), step.mutable_data(), threads, kp,
                                dst_abs_max.mutable_data());
                    else if (res)
                        qsp::batch_norm_add_relu_forward(
                                d, s, res, g, b, rm, rv, dst.mutable_data(), mask.mutable_data(),
                                mean.mutable_data(), invstd.mutable_data(), bv, threads, kp);
                    else if (keep_s8)
                        qsp::batch_norm_relu_forward(d, s, g, b, rm, rv, dst.mutable_data(),
                                                     mask.mutable_data(), mean.mutable_data(),
                                                     invstd.mutable_data(), bv,
                                                     centered.mutable_data(), step.mutable_data(),
                                                     dst_abs_max.mutable_data(), threads, kp);
                    else
                        qsp::batch_norm_relu_forward(d, s, g, b, rm, rv, dst.mutable_data(),
                                                     mask.mutable_data(), mean.mutable_data(),
                                                     invstd.mutable_data(), bv, threads, kp);
                }
                return py::make_tuple(dst, mask, mean, invstd, batch_var, centered, step,
                                      dst_abs_max);
            },
            py::arg("src"), py::arg("gamma"), py::arg("beta"), py::arg("running_mean"),
            py::arg("running_var"), py::arg("eps"), py::arg("batch_statistics"), py::arg("relu"),
            py::arg("keep_s8"), py::arg("residual"), py::arg("threads"),
            py::arg("known") = py::none());
    // src: the forward's src (float32, with mean), or its int8 copy (int8,
    // with step). need_diff_residual: also the gradient of a residual the
    // forward added (empty otherwise). Returns (diff_src, diff_gamma,
    // diff_beta, diff_residual, diff_src's max |.| per channel (from the
    // int8 copy with diff_src; empty otherwise)), each empty when not wanted.
    m.def(
            "batch_norm_relu_backward",
            [](const py::array &diff_dst, const py::object &mask, const py::array &src,
               const py::object &gamma, const py::array &mean, const py::object &step,
               const py::array &invstd, bool batch_statistics, bool relu, bool need_diff_src,
               bool need_affine, bool need_diff_residual, int threads) {
                const qsp::batch_norm_relu_desc d =
                        batch_norm_desc(src, 0.0, batch_statistics, relu);
                const dims shape(src.shape(), src.shape() + 4), per_channel{d.channels};
                const int64_t n = d.batch * d.channels * d.spatial;
                const float *dy = checked<float>(diff_dst, "diff_dst", shape, false);
                const bool from_s8 = !step.is_none();
                const float *s = from_s8 ? nullptr : checked<float>(src, "src", shape, false);
                const int8_t *q = from_s8 ? checked<int8_t>(src, "src", shape, false) : nullptr;
                const float *st = optional_f32(step, "step", per_channel);
                const uint8_t *bits = nullptr;
                if (relu) {
                    if (mask.is_none()) throw py::value_error("mask is needed with relu");
                    bits = checked<uint8_t>(as_array(mask, "mask"), "mask", {(n + 7) / 8}, false);
                }
                const float *g = optional_f32(gamma, "gamma", per_channel);
                const float *mu =
                        from_s8 ? nullptr : checked<float>(mean, "mean", per_channel, false);
                const float *inv = checked<float>(invstd, "invstd", per_channel, false);
                py::array_t<float> dx = pooled_array<float>(need_diff_src ? shape : dims{0});
                py::array_t<float> dres = pooled_array<float>(need_diff_residual ? shape : dims{0});
                py::array_t<float> dgamma(need_affine ? d.channels : 0),
                        dbeta(need_affine ? d.channels : 0);
                // an int8 block's dx feeds an s8 convolution: its channel maxima too
                const bool maxima = from_s8 && need_diff_src;
                py::array_t<float> dx_abs_max(maxima ? d.channels : 0);
                {
                    py::gil_scoped_release nogil;
                    float *dxp = need_diff_src ? dx.mutable_data() : nullptr;
                    float *dg = need_affine ? dgamma.mutable_data() : nullptr;
                    float *db = need_affine ? dbeta.mutable_data() : nullptr;
                    float *dr = need_diff_residual ? dres.mutable_data() : nullptr;
                    float *dm = maxima ? dx_abs_max.mutable_data() : nullptr;
                    if (dr && from_s8)
                        qsp::batch_norm_add_relu_backward(d, dy, bits, q, st, g, inv, dxp, dr, dg,
                                                          db, dm, threads);
                    else if (dr)
                        qsp::batch_norm_add_relu_backward(d, dy, bits, s, g, mu, inv, dxp, dr, dg,
                                                          db, threads);
                    else if (from_s8)
                        qsp::batch_norm_relu_backward(d, dy, bits, q, st, g, inv, dxp, dg, db, dm,
                                                      threads);
                    else
                        qsp::batch_norm_relu_backward(d, dy, bits, s, g, mu, inv, dxp, dg, db,
                                                      threads);
                }
                return py::make_tuple(dx, dgamma, dbeta, dres, dx_abs_max);
            },
            py::arg("diff_dst"), py::arg("mask"), py::arg("src"), py::arg("gamma"), py::arg("mean"),
            py::arg("step"), py::arg("invstd"), py::arg("batch_statistics"), py::arg("relu"),
            py::arg("need_diff_src"), py::arg("need_affine"), py::arg("need_diff_residual"),
            py::arg("threads"));

    py::class_<linear_layer>(m, "LinearKernel")
            .def(py::init<int64_t, int64_t, const py::array &, const py::array &,
                          const std::string &, bool>(),
                 py::arg("in_features"), py::arg("out_features"), py::arg("row_ptr"),
                 py::arg("col_idx"), py::arg("scheme"), py::arg("with_bias"))
            .def_property_readonly("nnz", &linear_layer::nnz)
            .def("same_pattern", &linear_layer::same_pattern)
            .def_property_readonly("scheme", &linear_layer::scheme)
            .def("workspace_bytes", &linear_layer::workspace_bytes)
            .def("implementations", &linear_layer::implementations)
            .def("forward", &linear_layer::fwd)
            .def("backward_data", &linear_layer::bwd_data)
            .def("backward_weights", &linear_layer::bwd_weights)
            .def("backward", &linear_layer::bwd);

    py::class_<linear_act_linear>(m, "LinearActLinear")
            .def(py::init<linear_layer &, linear_layer &>(), py::keep_alive<1, 2>(),
                 py::keep_alive<1, 3>(), py::arg("first"), py::arg("second"))
            .def("forward", &linear_act_linear::forward)
            .def("backward", &linear_act_linear::backward)
            .def("first_forward", &linear_act_linear::first_forward)
            .def("second_forward", &linear_act_linear::second_forward)
            .def("second_backward", &linear_act_linear::second_backward)
            .def("first_backward", &linear_act_linear::first_backward)
            .def("implementations", &linear_act_linear::implementations, py::arg("batch"),
                 py::arg("threads"));

    py::class_<conv2d_layer>(m, "Conv2dKernel")
            .def(py::init<int64_t, int64_t, std::array<int64_t, 2>, std::array<int64_t, 2>,
                          std::array<int64_t, 4>, std::array<int64_t, 2>, int64_t,
                          const py::array &, const py::array &, const std::string &, bool,
                          const std::string &>(),
                 py::arg("in_channels"), py::arg("out_channels"), py::arg("kernel_size"),
                 py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
                 py::arg("row_ptr"), py::arg("col_idx"), py::arg("scheme"), py::arg("with_bias"),
                 py::arg("vectorization") = "any")
            .def_property_readonly("vectorization", &conv2d_layer::vectorization)
            .def_property_readonly("nnz", &conv2d_layer::nnz)
            .def("same_pattern", &conv2d_layer::same_pattern)
            .def_property_readonly("scheme", &conv2d_layer::scheme)
            .def("output_hw", &conv2d_layer::output_hw)
            .def("workspace_bytes", &conv2d_layer::workspace_bytes)
            .def("implementations", &conv2d_layer::implementations)
            .def("forward", &conv2d_layer::fwd, py::arg("x"), py::arg("values"), py::arg("bias"),
                 py::arg("threads"), py::arg("x_abs_max"), py::arg("statistics") = false)
            .def("forward_after_batch_norm", &conv2d_layer::fwd_after_batch_norm, py::arg("bn_src"),
                 py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("known"),
                 py::arg("values"), py::arg("bias"), py::arg("threads"), py::arg("statistics"))
            .def("backward_data", &conv2d_layer::bwd_data)
            .def("backward_weights", &conv2d_layer::bwd_weights)
            .def("backward", &conv2d_layer::bwd);
}
