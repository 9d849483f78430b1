// "dense:onednn_s8" for Conv2d: the s8 scheme on oneDNN's int8 convolution
// (forward) and int8 deconvolution (backward-data: the transposed
// convolution with the same weights), beside the sparse JIT. oneDNN has no
// int8 backward-weights convolution: that direction is refused here and the
// sparse JIT runs it. As for Linear, the quantized weights are scattered
// into a dense int8 tensor per call, oneDNN computes exact int32 sums (VNNI
// or AMX only) in the layouts it prefers (reorders from and to NCHW), and
// the epilogue applies the scheme's scales exactly as the reference does:
// the results equal the reference bit for bit.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "primitives/core/s8_dy_quantization.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "primitives/core/s8_src_quantization.hpp"
#include "primitives/dense_onednn/dense_s8_conv2d.hpp"
#include "primitives/dense_onednn/onednn_common.hpp"
#include "primitives/passes/quantize.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dims = dnnl::memory::dims;

// The deconvolution's right / bottom padding that makes its output exactly
// the convolution's input (negative when the convolution never reads the
// last input rows: refused).
int64_t deconv_pad_end(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d,
                       int64_t pad_begin) {
    return (out - 1) * s + (k - 1) * d + 1 - pad_begin - in;
}

// Whether the convolution's windows read every input position of one
// dimension. oneDNN's int8 deconvolution writes only the positions some
// window reaches: the others keep what its buffer held (a 1-row kernel at
// stride 3 left the two rows between its windows as garbage, where their
// gradient is zero). And where no window reads the last positions, no
// deconvolution geometry gives the convolution's input size.
bool reads_every_input(int64_t in, int64_t out, int64_t k, int64_t s, int64_t d,
                       int64_t pad_begin) {
    std::vector<char> read(static_cast<size_t>(std::max<int64_t>(in, 0)), 0);
    for (int64_t o = 0; o < out; ++o)
        for (int64_t t = 0; t < k; ++t) {
            const int64_t i = o * s + t * d - pad_begin;
            if (i >= 0 && i < in) read[static_cast<size_t>(i)] = 1;
        }
    return std::all_of(read.begin(), read.end(), [](char r) { return r != 0; });
}

class dense_s8_conv2d_kernel : public kernel {
public:
    explicit dense_s8_conv2d_kernel(const problem &p) : p_(p), engine_(dnnl::engine::kind::cpu, 0) {
        const conv2d_shape &s = p.conv;
        const conv2d_geometry &g = s.g;
        const bool grouped = g.groups > 1;
        const dims x_dims{s.batch, s.in_c, s.in_h, s.in_w},
                y_dims{s.batch, s.out_c, s.out_h, s.out_w};
        // Our dense weights: [OC][IC/G][KH][KW], the CSR's row-major order.
        const dims w_conv = grouped ? dims{g.groups, s.out_c / g.groups, s.in_c / g.groups,
                                           g.kernel_h, g.kernel_w}
                                    : dims{s.out_c, s.in_c, g.kernel_h, g.kernel_w};
        const dims strides{g.stride_h, g.stride_w}, dil{g.dilation_h - 1, g.dilation_w - 1},
                pad_l{g.pad_top, g.pad_left};
        dnnl::primitive_attr attr;
        attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
        if (p.dir == direction::forward) {
            user_src_ = dnnl::memory::desc(x_dims, dt::s8, tag::nchw);
            user_w_ = dnnl::memory::desc(w_conv, dt::s8, grouped ? tag::goihw : tag::oihw);
            user_dst_ = dnnl::memory::desc(y_dims, dt::s32, tag::nchw);
            const dims pad_r{g.pad_bottom, g.pad_right};
            auto pd = dnnl::convolution_forward::primitive_desc(
                    engine_, dnnl::prop_kind::forward_inference,
                    dnnl::algorithm::convolution_direct,
                    dnnl::memory::desc(x_dims, dt::s8, tag::any),
                    dnnl::memory::desc(w_conv, dt::s8, tag::any),
                    dnnl::memory::desc(y_dims, dt::s32, tag::any), strides, dil, pad_l, pad_r,
                    attr);
            finish<dnnl::convolution_forward>(pd);
        } else {
            // The deconvolution's weights have dims [IC][OC] (per group): the
            // convolution's, whose bytes (oihw) are its iohw layout.
            const dims w_deconv = grouped ? dims{g.groups, s.in_c / g.groups, s.out_c / g.groups,
                                                 g.kernel_h, g.kernel_w}
                                          : dims{s.in_c, s.out_c, g.kernel_h, g.kernel_w};
            user_src_ = dnnl::memory::desc(y_dims, dt::s8, tag::nchw);
            user_w_ = dnnl::memory::desc(w_deconv, dt::s8, grouped ? tag::giohw : tag::iohw);
            user_dst_ = dnnl::memory::desc(x_dims, dt::s32, tag::nchw);
            const dims pad_r{deconv_pad_end(s.in_h, s.out_h, g.kernel_h, g.stride_h, g.dilation_h,
                                            g.pad_top),
                             deconv_pad_end(s.in_w, s.out_w, g.kernel_w, g.stride_w, g.dilation_w,
                                            g.pad_left)};
            auto pd = dnnl::deconvolution_forward::primitive_desc(
                    engine_, dnnl::prop_kind::forward_inference,
                    dnnl::algorithm::deconvolution_direct,
                    dnnl::memory::desc(y_dims, dt::s8, tag::any),
                    dnnl::memory::desc(w_deconv, dt::s8, tag::any),
                    dnnl::memory::desc(x_dims, dt::s32, tag::any), strides, dil, pad_l, pad_r,
                    attr);
            finish<dnnl::deconvolution_forward>(pd);
        }
    }

    // Backward-data reads dY only through s8::quantize_dx_gradient.
    bool quantizes_diff_dst_only() const override { return p_.dir == direction::backward_data; }

    const char *execute(const tensors &t) const override {
        runtime::scratchpad sp;
        const int nt = p_.num_threads;
        const conv2d_shape &s = p_.conv;
        const int64_t nnz = p_.pattern.nnz(), x_elems = p_.src_elems(), y_elems = p_.dst_elems();
        const int64_t out_px = s.out_h * s.out_w;
        // The forward quantizes the weights (into the workspace when
        // training); backward-data reads the forward's copy.
        const s8::workspace_view &ws = t.workspace;
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, s.out_c);
        if (p_.dir == direction::forward) quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        int8_t *wd = sp.get<int8_t>(2, s.out_c * p_.pattern.cols());
        scatter_dense_s8(p_.pattern, wq, wd, nt);
        if (p_.dir == direction::forward) {
            int8_t *xq = t.workspace ? ws.src_q() : sp.get<int8_t>(3, x_elems);
            const float sx = s8::quantized_src(t, x_elems, xq, nt);
            if (t.workspace) ws.set_src_scale(sx);
            int32_t *acc = sp.get<int32_t>(4, y_elems);
            run(xq, wd, acc, sp);
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static)
            for (int64_t b = 0; b < s.batch; ++b)
                for (int64_t o = 0; o < s.out_c; ++o) {
                    const float scale = s8::forward_scale(sx, w_scale[o]);
                    const float bias = t.bias ? t.bias[o] : 0.f;
                    const int64_t base = (b * s.out_c + o) * out_px;
                    for (int64_t i = 0; i < out_px; ++i)
                        t.dst[base + i] = static_cast<float>(acc[base + i]) * scale + bias;
                }
        } else {
            int8_t *g2 = sp.get<int8_t>(3, y_elems);
            const float sg2 =
                    s8::quantize_dx_gradient(t, y_elems, w_scale, s.out_c, out_px, g2, nt);
            int32_t *acc = sp.get<int32_t>(4, x_elems);
            run(g2, wd, acc, sp); // iohw: the same bytes as the convolution's oihw
#pragma omp parallel for num_threads(nt) schedule(static)
            for (int64_t i = 0; i < x_elems; ++i)
                t.diff_src[i] = static_cast<float>(acc[i]) * sg2;
        }
        return nullptr;
    }

private:
    template <typename prim_t, typename pd_t> void finish(const pd_t &pd) {
        src_ = pd.src_desc();
        w_ = pd.weights_desc();
        dst_ = pd.dst_desc();
        scratch_ = pd.scratchpad_desc();
        prim_ = prim_t(pd);
        if (src_ != user_src_)
            src_reorder_ =
                    dnnl::reorder(dnnl::reorder::primitive_desc(engine_, user_src_, engine_, src_));
        if (w_ != user_w_)
            w_reorder_ =
                    dnnl::reorder(dnnl::reorder::primitive_desc(engine_, user_w_, engine_, w_));
        if (dst_ != user_dst_)
            dst_reorder_ =
                    dnnl::reorder(dnnl::reorder::primitive_desc(engine_, dst_, engine_, user_dst_));
    }

    // src (NCHW s8) * weights (the user layout) -> dst (NCHW s32), through
    // oneDNN's preferred layouts.
    void run(const int8_t *src, const int8_t *w, int32_t *dst, runtime::scratchpad &sp) const {
        auto buffer = [&](int slot, const dnnl::memory::desc &md) {
            return dnnl::memory(md, engine_, sp.bytes(slot, std::max<size_t>(md.get_size(), 1)));
        };
        omp_threads_guard guard(p_.num_threads);
        const auto timed = kernel_time(p_.dir);
        dnnl::stream stream(engine_); // per call: executions may run concurrently
        dnnl::memory us(user_src_, engine_, const_cast<int8_t *>(src)),
                uw(user_w_, engine_, const_cast<int8_t *>(w)), ud(user_dst_, engine_, dst);
        dnnl::memory ms = us, mw = uw, md = ud;
        if (src_ != user_src_) {
            ms = buffer(6, src_);
            src_reorder_.execute(stream, us, ms);
        }
        if (w_ != user_w_) {
            mw = buffer(7, w_);
            w_reorder_.execute(stream, uw, mw);
        }
        if (dst_ != user_dst_) md = buffer(8, dst_);
        prim_.execute(stream, {{DNNL_ARG_SRC, ms},
                               {DNNL_ARG_WEIGHTS, mw},
                               {DNNL_ARG_DST, md},
                               {DNNL_ARG_SCRATCHPAD, buffer(9, scratch_)}});
        if (dst_ != user_dst_) dst_reorder_.execute(stream, md, ud);
        stream.wait();
    }

    problem p_;
    dnnl::engine engine_;
    dnnl::memory::desc user_src_, user_w_, user_dst_, src_, w_, dst_, scratch_;
    dnnl::primitive prim_;
    dnnl::reorder src_reorder_, w_reorder_, dst_reorder_;
};

std::string dense_conv_refusal(const problem &p) {
    if (p.scheme != quant_scheme::s8) return "s8 only";
    if (p.dir == direction::backward_weights)
        return "oneDNN has no int8 backward-weights convolution: the sparse JIT runs it";
    if (effective_cpu_isa() == cpu_isa::ref) return "QSP_MAX_CPU_ISA=ref selects the reference";
    static const bool exact = onednn_int8_is_exact();
    if (!exact)
        return "oneDNN's int8 convolution on this CPU has no VNNI/AMX: its int16 intermediate "
               "sums saturate, results would not be exact";
    const conv2d_shape &s = p.conv;
    const conv2d_geometry &g = s.g;
    const int64_t reduction = p.dir == direction::forward
                                      ? s.in_c / g.groups * g.kernel_h * g.kernel_w
                                      : s.out_c / g.groups * g.kernel_h * g.kernel_w;
    if (reduction > int32_safe_reduction_length)
        return "a reduction of " + std::to_string(reduction)
               + " terms could overflow oneDNN's int32 accumulator";
    if (p.dir == direction::backward_data
        && (!reads_every_input(s.in_h, s.out_h, g.kernel_h, g.stride_h, g.dilation_h, g.pad_top)
            || !reads_every_input(s.in_w, s.out_w, g.kernel_w, g.stride_w, g.dilation_w,
                                  g.pad_left)))
        return "the convolution never reads some input rows or columns (a stride past the "
               "kernel's reach, dilation gaps, or the last rows): oneDNN's int8 deconvolution "
               "would leave their zero gradient unwritten";
    return "";
}

} // namespace

implementation dense_onednn_s8_conv2d_implementation() {
    return {"dense:onednn_s8",
            dense_conv_refusal,
            [](const problem &p) -> std::shared_ptr<const kernel> {
                return std::make_shared<const dense_s8_conv2d_kernel>(p);
            },
            false,
            op_kind::conv2d,
            {}};
}

} // namespace qsp::detail
