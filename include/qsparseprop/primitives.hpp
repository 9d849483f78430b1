// Primitive descriptors and primitives for sparse Linear and Conv2d, in the
// shape of oneDNN v3: a primitive_desc validates a configuration (and throws
// std::invalid_argument naming the argument and the rule when it refuses),
// picks an implementation, and a primitive executes it on a dnnl::stream with
// dnnl::memory arguments keyed by DNNL_ARG_*.
//
// Arguments (all dense tensors f32, plain row-major layouts; Linear's
// activations and their gradients may take the kept layout instead, see
// kept_layout_desc):
//   forward          SRC (or, s8 Conv2d, QSP_ARG_SRC_S8 + _SCALE: src given
//                    quantized), WEIGHTS (nnz values), BIAS (optional),
//                    QSP_ARG_SRC_ABS_MAX (s8, optional) -> DST,
//                    WORKSPACE (s8 + forward_training: the quantized SRC and
//                    WEIGHTS, which are all the backward needs of them);
//                    the post-ops' (primitive_attr::ops) by QSP_ARG_POST_OP
//   backward_data    DIFF_DST, WEIGHTS (f32) or WORKSPACE (s8),
//                    QSP_ARG_ROUNDING_SEED (s8),
//                    QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX (s8, optional) -> DIFF_SRC
//   backward_weights SRC (f32) or WORKSPACE (s8), DIFF_DST,
//                    QSP_ARG_ROUNDING_SEED (s8),
//                    QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX (s8, optional)
//                    -> DIFF_WEIGHTS (nnz), DIFF_BIAS
// An s8 step quantizes the weights once: backward-data reads the forward's
// copy, so run it with the workspace of this step's forward.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "qsparseprop/formats.hpp"

namespace qsp {

// A 1-D s32 memory of 2 elements (low, high 32 bits) holding the 64-bit seed
// of the stochastic rounding of output gradients (s8 scheme only).
constexpr int QSP_ARG_ROUNDING_SEED = 1 << 24;

// The descriptor of a dense f32 tensor of shape `dims` in the plain
// row-major layout every dense argument of these primitives takes (the
// innermost dimension contiguous).
inline dnnl::memory::desc plain_f32_desc(const dnnl::memory::dims &dims) {
    dnnl::memory::dims strides(dims.size(), 1);
    for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i)
        strides[i] = strides[i + 1] * dims[i + 1];
    return dnnl::memory::desc(dims, dnnl::memory::data_type::f32, strides);
}

// The kept layout: what Linear's JIT kernels read and write, so that between
// two sparse Linear layers the activation and its gradient never go back to
// the plain layout (oneDNN's format_tag::any idea, chosen by the caller).
// Batch-innermost tiles of 64 examples, [ceil(batch / 64)][features][64],
// zero beyond the batch: oneDNN's blocked format Acb64a over the dims
// {batch, features, 1}, so dnnl::reorder converts to and from the plain
// layout. A Linear descriptor given it for src / dst (backward: diff_src /
// diff_dst) reads or writes that argument in it; every implementation
// accepts it (those whose kernels do not read tiles convert on the way, at
// the cost of the pass the layout saves elsewhere). Post-ops then run over
// the tiles: the relu mask covers them padding included
// ((ceil(batch / 64) * 64 * features + 7) / 8 bytes), an add's src is in the
// kept layout too, and batch statistics are refused (the padding would count).
inline dnnl::memory::desc kept_layout_desc(int64_t batch, int64_t features) {
    return dnnl::memory::desc({batch, features, 1}, dnnl::memory::data_type::f32,
                              dnnl::memory::format_tag::Acb64a);
}

// Optional, s8 backward_data (and the fused sparse_backward): a 1-D f32
// memory of the output channels (diff_dst_channel_abs_max_desc) holding, per
// channel, max |diff_dst| (NaN where the channel holds a NaN) as whoever
// wrote diff_dst found it (batch_norm_relu_backward's
// diff_src_channel_abs_max): the fused backward's two roundings of diff_dst
// (sparse_backward) then skip their pass finding the maxima; other
// executions may ignore it. The integers are the same as without it when
// the maxima are exact; a maximum below the true one clamps values to +-127.
constexpr int QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX = QSP_ARG_ROUNDING_SEED + 1;

// The descriptor of the QSP_ARG_ROUNDING_SEED argument.
inline dnnl::memory::desc rounding_seed_desc() {
    return dnnl::memory::desc({2}, dnnl::memory::data_type::s32, dnnl::memory::dims{1});
}

// Optional, s8 forward: a 1-D f32 memory of one element
// (src_abs_max_desc) holding max |src| (NaN where src holds a NaN) as
// whoever wrote src found it (batch_norm_relu_forward's dst_abs_max): the
// input's quantization then skips its pass finding it. The same integers
// when it is exact; a maximum below the true one clamps values to +-127.
constexpr int QSP_ARG_SRC_ABS_MAX = QSP_ARG_ROUNDING_SEED + 2;

inline dnnl::memory::desc src_abs_max_desc() {
    return plain_f32_desc({1});
}

// Optional, s8 Conv2d backward_data / backward_weights (and the fused
// sparse_backward): diff_dst described as the backward of the int8
// BatchNorm (+ ReLU) that follows the convolution — the int8 form of
// batch_norm_relu_backward below — instead of read from memory:
//   diff_dst = g * a[c] + centered * step[c] * b[c] + k[c],
//   g = QSP_ARG_BN_DIFF_DST (its diff_dst) where QSP_ARG_BN_MASK (its relu
//       mask, optional) is set, else 0,
// with QSP_ARG_BN_CENTERED / QSP_ARG_BN_STEP its forward's int8 copy and
// QSP_ARG_BN_COEFFICIENTS the 3 x C floats a, b, k (batch_norm_relu_backward
// with diff_src == nullptr and `coefficients` writes them; so does the
// channel maxima QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX, found without writing
// diff_dst). The fused backward then rounds diff_dst as it computes it
// (chunk by chunk in cache) and diff_dst is never written: its memory,
// DNNL_ARG_DIFF_DST, is still passed and is scratch, written with diff_dst
// only where an execution needs it in memory (a separate backward_data or
// backward_weights, a bias gradient, an implementation that reads it
// itself). The integers are those of the materialised diff_dst. All four
// required arguments together or none; descriptors batch_norm_source_descs.
constexpr int QSP_ARG_BN_DIFF_DST = QSP_ARG_ROUNDING_SEED + 3;
constexpr int QSP_ARG_BN_MASK = QSP_ARG_ROUNDING_SEED + 4;
constexpr int QSP_ARG_BN_CENTERED = QSP_ARG_ROUNDING_SEED + 5;
constexpr int QSP_ARG_BN_STEP = QSP_ARG_ROUNDING_SEED + 6;
constexpr int QSP_ARG_BN_COEFFICIENTS = QSP_ARG_ROUNDING_SEED + 7;

// Optional, s8 Conv2d forward: src given already quantized, as the forward
// would quantize it (quantization.hpp: Xq = round-half-even(src / sx) per
// tensor, sx from max |src|) — by the writer of src, which then need not
// write src itself (batch_norm_relu_forward_quantized):
//   QSP_ARG_SRC_S8        s8 memory of src's dims (plain NCHW): Xq,
//   QSP_ARG_SRC_S8_SCALE  f32 memory of one element: sx.
// Both together; SRC is then not read and may be left out. Xq given at the
// descriptor's workspace_src_s8_offset() inside the workspace is used in
// place; elsewhere it is copied there (or into scratch without a
// workspace). The integers and the outputs are those of the forward of the
// f32 src Xq was rounded from.
constexpr int QSP_ARG_SRC_S8 = QSP_ARG_ROUNDING_SEED + 8;
constexpr int QSP_ARG_SRC_S8_SCALE = QSP_ARG_ROUNDING_SEED + 9;

// The descriptors of those arguments for a Conv2d of output dims
// {N, C, H, W}: diff_dst f32 {N, C, H, W}; mask u8 {(N*C*H*W + 7) / 8};
// centered s8 {N*C*H*W}; step f32 {C}; coefficients f32 {3, C}.
struct batch_norm_source_descs {
    dnnl::memory::desc diff_dst, mask, centered, step, coefficients;
};
batch_norm_source_descs batch_norm_source_descriptors(const dnnl::memory::dims &dst_dims);

// The descriptor of QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX for a layer of
// `channels` output channels (features).
inline dnnl::memory::desc diff_dst_channel_abs_max_desc(int64_t channels) {
    return plain_f32_desc({channels});
}

enum class prop_kind { forward_training, forward_inference };
enum class quant_scheme { f32, s8 };
const char *to_string(quant_scheme s);

// Conv2d: the dimension the JIT kernels put in vector lanes. `batch`
// (batch-innermost tiles) suits small images and deep layers, where a row of
// an image fills few lanes; `output_width` (NCHW planes, lanes along an
// output row) suits large images and early layers, and needs no transposes.
// `any` lets dispatch and the tuner decide per layer and direction.
enum class conv_vectorization { any, batch, output_width };
const char *to_string(conv_vectorization v);

// Post-ops: what a forward primitive applies to its output after computing
// it, in order, within the same execution (oneDNN's post-op chain in spirit).
// Consecutive elementwise post-ops run as one pass over the output while a
// chunk of it is in cache; batch statistics take a pass of their own, except
// as the first post-op of a Conv2d forward on the output-width AVX-512
// kernels, which take them while they write dst (no pass over dst).
// "Channel" is an output feature (Linear: a column of dst; Conv2d: an output
// channel plane). Arguments of post-op i go by QSP_ARG_POST_OP(i, ...).
class post_ops {
public:
    enum class kind {
        relu,             // dst = max(0, dst) as torch.relu (NaN and -0.0 pass); with the
                          // optional QSP_POST_OP_MASK argument, also its 1-bit mask as
                          // relu_with_mask_forward writes it ((dst elements + 7) / 8 u8)
        gelu_tanh,        // torch's gelu(approximate='tanh')
        gelu_erf,         // torch's gelu()
        add,              // dst += QSP_POST_OP_SRC (f32, dst's dims): a residual
        batch_statistics, // QSP_POST_OP_MEAN, QSP_POST_OP_VARIANCE (f32, one per channel):
                          // the mean and biased variance of dst at this point of the
                          // chain, as training-mode BatchNorm needs them; with the
                          // optional QSP_POST_OP_RANGE (f32, two per channel), also
                          // each channel's lowest and highest value (the int8 copy of
                          // a BatchNorm's input needs them)
    };
    post_ops &append_relu() { return append(kind::relu); }
    post_ops &append_gelu(bool tanh_approximation) {
        return append(tanh_approximation ? kind::gelu_tanh : kind::gelu_erf);
    }
    post_ops &append_add() { return append(kind::add); }
    post_ops &append_batch_statistics() { return append(kind::batch_statistics); }
    int len() const { return static_cast<int>(ops_.size()); }
    kind at(int index) const { return ops_.at(static_cast<size_t>(index)); }

private:
    post_ops &append(kind k) {
        ops_.push_back(k);
        return *this;
    }
    std::vector<kind> ops_;
};
const char *to_string(post_ops::kind k);

// The arguments of post-op `index`.
enum qsp_post_op_arg {
    QSP_POST_OP_SRC = 0,
    QSP_POST_OP_MASK,
    QSP_POST_OP_MEAN,
    QSP_POST_OP_VARIANCE,
    QSP_POST_OP_RANGE
};
constexpr int QSP_ARG_POST_OP_BASE = 1 << 25;
constexpr int QSP_ARG_POST_OP_STRIDE = 5; // argument ids per post-op (the qsp_post_op_arg values)
constexpr int QSP_ARG_POST_OP(int index, qsp_post_op_arg what) {
    return QSP_ARG_POST_OP_BASE + QSP_ARG_POST_OP_STRIDE * index + static_cast<int>(what);
}

struct primitive_attr {
    // OpenMP team size for this primitive; 0 = omp_get_max_threads()
    // (backward descriptors: 0 = the forward hint's).
    int num_threads = 0;
    // Forces an implementation by the name impl_info_str() prints (e.g.
    // "jit:avx512_core_vnni", "dense:onednn_s8", "ref:any") instead of the
    // tuned or first-in-order pick; a descriptor whose forced implementation
    // cannot run the problem is refused with that implementation's reason.
    // Empty = pick as usual.
    std::string implementation;
    // Conv2d only: restricts the JIT implementations to one vectorization
    // (the reference and dense implementations are not restricted).
    // Backward descriptors left at `any` follow their forward hint.
    conv_vectorization vectorization = conv_vectorization::any;
    // Tune while the descriptor is created: measure the implementations that
    // accept its problem (qsp::tune with default options; a stored decision,
    // in memory or in the persistent cache, is reused without measuring) and
    // pick the winner, so one descriptor carries the tuned decision.
    // primitive_desc_base::tuning() then says what was measured. Ignored when
    // `implementation` forces one.
    bool tune = false;
    // Forward primitives only (a backward descriptor with post-ops is
    // refused); every implementation runs them the same way.
    post_ops ops;
};

struct tuning_result; // qsparseprop/tuning.hpp

struct conv2d_geometry {
    int64_t kernel_h = 1, kernel_w = 1;
    int64_t stride_h = 1, stride_w = 1;
    int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
    int64_t dilation_h = 1, dilation_w = 1; // 1 = dense kernel (torch's convention)
    int64_t groups = 1;
};

// Checks a Conv2d geometry before anything is computed from it: kernel
// sizes, strides, dilations and groups >= 1, paddings >= 0, and (when given,
// i.e. > 0) channel counts divisible by groups. Throws std::invalid_argument
// naming the field and the value.
void check_conv2d_geometry(const conv2d_geometry &g, int64_t in_channels = 0,
                           int64_t out_channels = 0);
// Output height and width of a convolution of an in_h x in_w input (after
// check_conv2d_geometry); throws std::invalid_argument when the input is
// empty or the dilated kernel does not fit the padded input.
std::array<int64_t, 2> conv2d_output_hw(const conv2d_geometry &g, int64_t in_h, int64_t in_w);

using exec_args = std::unordered_map<int, dnnl::memory>;

namespace detail {
struct pd_impl;
struct kernel;
struct shared_gradient;
} // namespace detail

// Common part of every primitive descriptor: the validated problem and the
// implementation picked for it (the tuner's stored decision for this
// problem, else the first implementation in list order that accepts it;
// see qsparseprop/tuning.hpp). Creating a descriptor measures nothing unless
// primitive_attr::tune asks it to.
class primitive_desc_base {
public:
    std::string impl_info_str() const;
    const char *primitive_name() const;
    quant_scheme scheme() const;
    prop_kind prop() const;
    const csr_pattern &pattern() const;
    int num_threads() const;
    dnnl::memory::desc weights_desc() const;   // nnz f32 values
    dnnl::memory::desc workspace_desc() const; // zero-size when none
    // What tuning at creation found (primitive_attr::tune), else nullptr.
    const tuning_result *tuning() const;
    // Whether the picked implementation's kernels read and write the kept
    // layout (kept_layout_desc) themselves; the others accept it too, but
    // convert on the way, so a caller choosing layouts keeps the plain one
    // for them.
    bool takes_kept_layout() const;
    const std::shared_ptr<detail::pd_impl> &impl() const { return impl_; }

protected:
    std::shared_ptr<detail::pd_impl> impl_;
};

// A primitive builds what its descriptor's implementation needs to run (the
// per-layer plan, generated code; both cached, so a second primitive of the
// same layer finds them) and executes it.
class primitive_base {
public:
    void execute(const dnnl::stream &stream, const exec_args &args) const;
    // The fused backward's execution (sparse_backward below): `shared` carries
    // the output gradient's packing from one direction to the other.
    void execute(const dnnl::stream &stream, const exec_args &args,
                 detail::shared_gradient *shared) const;

protected:
    template <typename, typename> friend class sparse_backward; // reads the kernels' wishes
    void init(const primitive_desc_base &pd);
    std::shared_ptr<detail::pd_impl> pd_;
    std::shared_ptr<const detail::kernel> kernel_;
};

// ---- Linear: src B x K, weights N x K (CSR), dst B x N -------------------

struct sparse_linear_forward : primitive_base {
    struct primitive_desc : primitive_desc_base {
        primitive_desc(const dnnl::engine &engine, prop_kind prop,
                       const dnnl::memory::desc &src_desc, const csr_pattern &weights,
                       const dnnl::memory::desc &bias_desc, const dnnl::memory::desc &dst_desc,
                       quant_scheme scheme, const primitive_attr &attr = {});
        primitive_desc(const dnnl::engine &engine, prop_kind prop,
                       const dnnl::memory::desc &src_desc, const csr_pattern &weights,
                       const dnnl::memory::desc &dst_desc, quant_scheme scheme,
                       const primitive_attr &attr = {});
        dnnl::memory::desc src_desc() const;
        dnnl::memory::desc dst_desc() const;
        dnnl::memory::desc bias_desc() const;
    };
    explicit sparse_linear_forward(const primitive_desc &pd);
};

struct sparse_linear_backward_data : primitive_base {
    struct primitive_desc : primitive_desc_base {
        primitive_desc(const dnnl::engine &engine, const dnnl::memory::desc &diff_src_desc,
                       const csr_pattern &weights, const dnnl::memory::desc &diff_dst_desc,
                       const sparse_linear_forward::primitive_desc &hint,
                       const primitive_attr &attr = {});
    };
    explicit sparse_linear_backward_data(const primitive_desc &pd);
};

struct sparse_linear_backward_weights : primitive_base {
    struct primitive_desc : primitive_desc_base {
        // diff_bias_desc may be a zero memory::desc when there is no bias.
        primitive_desc(const dnnl::engine &engine, const dnnl::memory::desc &src_desc,
                       const csr_pattern &weights, const dnnl::memory::desc &diff_bias_desc,
                       const dnnl::memory::desc &diff_dst_desc,
                       const sparse_linear_forward::primitive_desc &hint,
                       const primitive_attr &attr = {});
    };
    explicit sparse_linear_backward_weights(const primitive_desc &pd);
};

// ---- Conv2d: src N x C x H x W, weights OC x (C/groups * KH * KW) (CSR),
// dst N x OC x OH x OW -------------------------------------------------------

struct sparse_conv2d_forward : primitive_base {
    struct primitive_desc : primitive_desc_base {
        primitive_desc(const dnnl::engine &engine, prop_kind prop,
                       const dnnl::memory::desc &src_desc, const csr_pattern &weights,
                       const dnnl::memory::desc &bias_desc, const dnnl::memory::desc &dst_desc,
                       const conv2d_geometry &geometry, quant_scheme scheme,
                       const primitive_attr &attr = {});
        dnnl::memory::desc src_desc() const;
        dnnl::memory::desc dst_desc() const;
        const conv2d_geometry &geometry() const;
        // s8 training: where in the workspace the forward keeps its
        // quantized src (N*C*H*W bytes): QSP_ARG_SRC_S8 there is used in
        // place. Throws std::invalid_argument for a descriptor without a
        // workspace.
        size_t workspace_src_s8_offset() const;
    };
    explicit sparse_conv2d_forward(const primitive_desc &pd);
};

struct sparse_conv2d_backward_data : primitive_base {
    struct primitive_desc : primitive_desc_base {
        primitive_desc(const dnnl::engine &engine, const dnnl::memory::desc &diff_src_desc,
                       const csr_pattern &weights, const dnnl::memory::desc &diff_dst_desc,
                       const sparse_conv2d_forward::primitive_desc &hint,
                       const primitive_attr &attr = {});
    };
    explicit sparse_conv2d_backward_data(const primitive_desc &pd);
};

struct sparse_conv2d_backward_weights : primitive_base {
    struct primitive_desc : primitive_desc_base {
        primitive_desc(const dnnl::engine &engine, const dnnl::memory::desc &src_desc,
                       const csr_pattern &weights, const dnnl::memory::desc &diff_bias_desc,
                       const dnnl::memory::desc &diff_dst_desc,
                       const sparse_conv2d_forward::primitive_desc &hint,
                       const primitive_attr &attr = {});
    };
    explicit sparse_conv2d_backward_weights(const primitive_desc &pd);
};

// ---- one backward call ------------------------------------------------------

// Backward-data and backward-weights of one layer in one execution, for
// callers that want both (a training step): the output gradient is packed
// (or quantized) once where both directions' implementations take it in the
// same form. The results equal the two primitives run separately (bit for bit
// in s8). Arguments: the union of the two primitives' (DIFF_DST, WEIGHTS,
// QSP_ARG_ROUNDING_SEED, SRC or WORKSPACE -> DIFF_SRC, DIFF_WEIGHTS,
// DIFF_BIAS). The descriptors must describe the same layer and shapes.
template <typename data_t, typename weights_t> class sparse_backward {
public:
    sparse_backward(const typename data_t::primitive_desc &data,
                    const typename weights_t::primitive_desc &weights);
    void execute(const dnnl::stream &stream, const exec_args &args) const;
    // "<backward-data implementation>/<backward-weights implementation>"
    std::string impl_info_str() const { return impl_info_; }

private:
    data_t data_;
    weights_t weights_;
    std::string impl_info_;
};
using sparse_linear_backward =
        sparse_backward<sparse_linear_backward_data, sparse_linear_backward_weights>;
using sparse_conv2d_backward =
        sparse_backward<sparse_conv2d_backward_data, sparse_conv2d_backward_weights>;

} // namespace qsp

namespace qsp {

// ---- ReLU keeping one bit per element -----------------------------------------

// For the activation memory of training: nn.ReLU keeps its fp32 output for
// the backward; these keep one bit per element (!(input <= 0): set for NaN,
// where torch's ReLU passes the gradient too), so an int8
// sparse layer after it leaves only its int8 copy of the activation saved.
// dst = max(0, src) exactly as torch.relu (NaN and -0.0 pass through);
// mask holds ceil(n / 8) bytes, element i in bit i % 8 of byte i / 8 (bits
// beyond n zero). dst may be src. num_threads <= 0: OpenMP's default.
void relu_with_mask_forward(const float *src, float *dst, uint8_t *mask, int64_t n,
                            int num_threads = 0);
// The same, also writing max |dst| (NaN where dst holds a NaN; 0 for n = 0)
// to *dst_abs_max, found while dst is written: an s8 layer reading dst takes
// it as its QSP_ARG_SRC_ABS_MAX and skips its own pass over dst.
void relu_with_mask_forward(const float *src, float *dst, uint8_t *mask, int64_t n,
                            float *dst_abs_max, int num_threads = 0);
// diff_src = mask bit ? diff_dst : 0, as torch's ReLU backward. diff_src may
// be diff_dst.
void relu_with_mask_backward(const float *diff_dst, const uint8_t *mask, float *diff_src, int64_t n,
                             int num_threads = 0);

// ---- the pixels a strided 1x1 convolution reads ----------------------------

// A 1x1 convolution without padding at stride (sh, sw) reads every sh-th
// row and sw-th column of its NCHW input and nothing else; a layer may run
// its kernels at stride 1 on those pixels. dst [batch][channels][ceil(h /
// sh)][ceil(w / sw)] = src[..][y * sh][x * sw]; the backward writes all of
// diff_src [batch][channels][h][w]: diff_dst where forward read, 0 elsewhere
// (each element once: no fill beforehand). Strides >= 1, h, w >= 1.
void subsample_pixels_forward(const float *src, int64_t batch, int64_t channels, int64_t h,
                              int64_t w, int64_t sh, int64_t sw, float *dst, int num_threads = 0);
void subsample_pixels_backward(const float *diff_dst, int64_t batch, int64_t channels, int64_t h,
                               int64_t w, int64_t sh, int64_t sw, float *diff_src,
                               int num_threads = 0);
// The same spread added into a diff_src that holds another gradient of
// the input already (the other layer reading it, as a residual block's
// first convolution beside its strided 1x1 shortcut): diff_src[..][y * sh]
// [x * sw] += diff_dst[..][y][x], the other elements untouched. The sum the
// spread and a separate add would make, reading and writing 1 / (sh * sw)
// of diff_src instead of all of it three times.
void subsample_pixels_backward_add(const float *diff_dst, int64_t batch, int64_t channels,
                                   int64_t h, int64_t w, int64_t sh, int64_t sw, float *diff_src,
                                   int num_threads = 0);

// ---- BatchNorm with the ReLU after it, over an NCHW tensor -------------------

// The BatchNorm2d (-ReLU) of the fused Conv2d-BatchNorm2d(-ReLU) block
// (python: qsparseprop.fuse): torch.nn.BatchNorm2d's arithmetic, in one
// statistics pass and one pass that normalises, applies the ReLU and keeps
// its mask (one bit per element, as relu_with_mask_forward) forward, and two
// passes backward. Statistics accumulate in double over float plane sums;
// a channel is reduced by one thread, so results do not depend on the
// thread count.
struct batch_norm_relu_desc {
    int64_t batch = 0, channels = 0, spatial = 0; // N, C, H * W of a contiguous NCHW tensor
    double epsilon = 1e-5;
    // true: normalise with this batch's mean and biased variance (training,
    // or track_running_stats=False); false: with running_mean / running_var.
    bool batch_statistics = true;
    bool relu = false;
};

// Batch statistics of src as whatever wrote src found them: the
// batch_statistics post-op (QSP_POST_OP_MEAN, _VARIANCE, _RANGE) of the
// forward primitive whose dst src is, taken while it wrote it. A forward
// below given them (`known`, with batch statistics) uses them as its
// batch's and makes no statistics pass of its own; the int8 copy of src
// needs the range too.
struct batch_norm_known_statistics {
    const float *mean = nullptr, *variance = nullptr; // C floats each: mean, biased variance
    const float *range = nullptr; // 2 x C floats: lowest, highest per channel (or null)
};

// src, dst: N*C*H*W floats (dst may be src). gamma, beta: C floats, or null
// for 1 and 0 (affine=False). running_mean, running_var: read only without
// batch statistics. Writes mean and invstd (C floats each: what the backward
// takes), mask ((N*C*H*W + 7) / 8 bytes) with relu, and, with batch
// statistics, batch_var (C floats, the biased variance; may be null) for the
// caller's running-statistics update. Throws std::invalid_argument for a
// malformed descriptor or a missing argument.
void batch_norm_relu_forward(const batch_norm_relu_desc &d, const float *src, const float *gamma,
                             const float *beta, const float *running_mean, const float *running_var,
                             float *dst, uint8_t *mask, float *mean, float *invstd,
                             float *batch_var, int num_threads = 0,
                             const batch_norm_known_statistics *known = nullptr);
// diff_dst, src (the forward's src), mask, mean, invstd as the forward gave
// them; gamma as the forward's. diff_src (may alias diff_dst), diff_gamma,
// diff_beta may each be null when not wanted.
void batch_norm_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                              const uint8_t *mask, const float *src, const float *gamma,
                              const float *mean, const float *invstd, float *diff_src,
                              float *diff_gamma, float *diff_beta, int num_threads = 0);

// The same pair keeping src for the backward in one byte per element, as the
// int8 blocks do (docs/quantization.md, "BatchNorm's saved input"): the
// backward needs src only as src - mean, so the forward writes per channel
// step[c] = max |src - mean[c]| / 127 (quant_scale_from_abs_max: NaN where
// the channel holds a NaN or an infinity) and centered[i] = round-half-even
// ((src[i] - mean[c]) / step[c]) in [-127, 127] (float arithmetic:
// (src - mean) * (1 / step)), N*C*H*W bytes; the caller then drops src.
// Needs batch statistics (the only mean whose range the statistics pass
// sees); std::invalid_argument otherwise. With dst_abs_max (one float),
// also max |dst| (NaN where dst holds a NaN), from each channel's range at
// no cost: the next s8 layer takes it as its QSP_ARG_SRC_ABS_MAX and skips
// its own pass over dst.
void batch_norm_relu_forward(const batch_norm_relu_desc &d, const float *src, const float *gamma,
                             const float *beta, const float *running_mean, const float *running_var,
                             float *dst, uint8_t *mask, float *mean, float *invstd,
                             float *batch_var, int8_t *centered, float *step, float *dst_abs_max,
                             int num_threads = 0,
                             const batch_norm_known_statistics *known = nullptr);
// The int8 forward whose dst only an s8 Conv2d reads (the first convolution
// of a residual block feeding the second, python's fused blocks): dst is
// not written; in its place `dst.values` (N*C*H*W bytes) gets the integers
// that convolution's forward would quantize dst into (quantization.hpp:
// round-half-even per tensor, the scale from max |dst|), and *dst.scale
// that scale — the convolution's QSP_ARG_SRC_S8 and QSP_ARG_SRC_S8_SCALE.
// max |dst| comes from each channel's range at no cost, so src is read
// once and the f32 dst never goes to memory. Needs batch statistics (the
// range), as the int8 copy does; mask, mean, invstd, batch_var, centered,
// step as above. `known` statistics whose range understates src make a
// scale below the true maximum's: values then clamp to +-127 (a NaN to -127).
struct batch_norm_quantized_dst {
    int8_t *values = nullptr;
    float *scale = nullptr;
};
void batch_norm_relu_forward_quantized(const batch_norm_relu_desc &d, const float *src,
                                       const float *gamma, const float *beta,
                                       const batch_norm_quantized_dst &dst, uint8_t *mask,
                                       float *mean, float *invstd, float *batch_var,
                                       int8_t *centered, float *step, int num_threads = 0,
                                       const batch_norm_known_statistics *known = nullptr);
// The backward with src - mean read as centered * step. With
// diff_src_channel_abs_max (C floats; needs diff_src), also max |diff_src|
// per channel (NaN where the channel holds a NaN), found while diff_src is
// written: the sparse convolution before the BatchNorm takes it as its
// QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX and skips its own pass over diff_src.
void batch_norm_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                              const uint8_t *mask, const int8_t *centered, const float *step,
                              const float *gamma, const float *invstd, float *diff_src,
                              float *diff_gamma, float *diff_beta, float *diff_src_channel_abs_max,
                              int num_threads = 0);

// The int8 backward without diff_src, for the s8 Conv2d before the
// BatchNorm to compute it where it rounds it (QSP_ARG_BN_*): the
// coefficients a, b, k (3 x C floats, a first) of diff_src = g * a[c] +
// centered * step[c] * b[c] + k[c] (g: diff_dst through the mask), and
// diff_gamma, diff_beta, diff_src_channel_abs_max (found without writing
// diff_src; optional each) as batch_norm_relu_backward writes them; with
// diff_residual (N*C*H*W floats, or null), the residual form's
// (batch_norm_add_relu_backward's) gradient of the residual as well.
void batch_norm_relu_backward_coefficients(const batch_norm_relu_desc &d, const float *diff_dst,
                                           const uint8_t *mask, const int8_t *centered,
                                           const float *step, const float *gamma,
                                           const float *invstd, float *coefficients,
                                           float *diff_residual, float *diff_gamma,
                                           float *diff_beta, float *diff_src_channel_abs_max,
                                           int num_threads = 0);

// A residual block's end (torchvision's BasicBlock: relu(bn2(conv2(x)) +
// identity)) in the same passes: dst = relu(batch_norm(src) + residual),
// the sum rounded as the unfused block rounds it (normalised value, then +
// residual[i]); residual is N*C*H*W floats (dst may alias src or residual).
// The backward also writes diff_residual (the gradient through the ReLU's
// mask, which the residual's branch receives; N*C*H*W floats, null: not
// wanted, aliasing neither diff_dst nor diff_src). Otherwise as the pairs
// above, with the f32 src or its int8 copy kept for the backward.
void batch_norm_add_relu_forward(const batch_norm_relu_desc &d, const float *src,
                                 const float *residual, const float *gamma, const float *beta,
                                 const float *running_mean, const float *running_var, float *dst,
                                 uint8_t *mask, float *mean, float *invstd, float *batch_var,
                                 int num_threads = 0,
                                 const batch_norm_known_statistics *known = nullptr);
void batch_norm_add_relu_forward(const batch_norm_relu_desc &d, const float *src,
                                 const float *residual, const float *gamma, const float *beta,
                                 const float *running_mean, const float *running_var, float *dst,
                                 uint8_t *mask, float *mean, float *invstd, float *batch_var,
                                 int8_t *centered, float *step, int num_threads = 0,
                                 const batch_norm_known_statistics *known = nullptr,
                                 float *dst_abs_max = nullptr);
void batch_norm_add_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                                  const uint8_t *mask, const float *src, const float *gamma,
                                  const float *mean, const float *invstd, float *diff_src,
                                  float *diff_residual, float *diff_gamma, float *diff_beta,
                                  int num_threads = 0);
void batch_norm_add_relu_backward(const batch_norm_relu_desc &d, const float *diff_dst,
                                  const uint8_t *mask, const int8_t *centered, const float *step,
                                  const float *gamma, const float *invstd, float *diff_src,
                                  float *diff_residual, float *diff_gamma, float *diff_beta,
                                  float *diff_src_channel_abs_max, int num_threads = 0);

} // namespace qsp
