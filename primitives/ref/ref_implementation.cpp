// The reference implementation as a dispatchable kernel: the portable
// quantization passes (s8) around the reference loops, following the s8
// protocol. Accepts every valid problem.
#include "primitives/ref/ref_implementation.hpp"

#include <vector>

#include "primitives/core/s8_protocol.hpp"
#include "primitives/core/s8_src_quantization.hpp"
#include "primitives/passes/bias_grad.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/ref/ref_kernels.hpp"

namespace qsp::detail {

namespace {

class ref_kernel : public kernel {
public:
    explicit ref_kernel(const problem &p) : p_(p) {
        if (p.op == op_kind::conv2d && p.dir == direction::backward_data)
            transposed_ = ref::transpose_conv2d_pattern(p.pattern);
    }

    const char *execute(const tensors &t) const override {
        {
            const auto timed = kernel_time(p_.dir); // the reference is all kernel
            if (p_.scheme == quant_scheme::f32)
                execute_f32(t);
            else
                execute_s8(t);
        }
        if (p_.dir == direction::backward_weights && t.diff_bias)
            bias_grad(t.diff_dst, t.diff_bias, p_.outer(), p_.channels(), p_.channel_inner(),
                      p_.num_threads);
        return nullptr;
    }

private:
    void execute_f32(const tensors &t) const {
        const int nt = p_.num_threads;
        const bool lin = p_.op == op_kind::linear;
        switch (p_.dir) {
            case direction::forward:
                if (lin)
                    ref::linear_fwd_f32(p_.pattern, t.weights, t.src, t.bias, t.dst, p_.batch, nt);
                else
                    ref::conv2d_fwd_f32(p_.conv, p_.pattern, t.weights, t.src, t.bias, t.dst, nt);
                break;
            case direction::backward_data:
                if (lin)
                    ref::linear_bwd_data_f32(p_.pattern, t.weights, t.diff_dst, t.diff_src,
                                             p_.batch, nt);
                else
                    ref::conv2d_bwd_data_f32(p_.conv, p_.pattern, transposed_, t.weights,
                                             t.diff_dst, t.diff_src, nt);
                break;
            case direction::backward_weights:
                if (lin)
                    ref::linear_bwd_weights_f32(p_.pattern, t.src, t.diff_dst, t.diff_weights,
                                                p_.batch, nt);
                else
                    ref::conv2d_bwd_weights_f32(p_.conv, p_.pattern, t.src, t.diff_dst,
                                                t.diff_weights, nt);
                break;
        }
    }

    void execute_s8(const tensors &t) const {
        const int nt = p_.num_threads;
        const bool lin = p_.op == op_kind::linear;
        switch (p_.dir) {
            case direction::forward: {
                // Training keeps Xq, Wq and their scales in the workspace
                // (the backward reads them); inference in local buffers.
                std::vector<uint8_t> local(t.workspace ? 0 : s8::workspace_bytes(p_));
                const s8::workspace_view ws =
                        t.workspace ? t.workspace : s8::workspace_view{local.data(), p_};
                portable::quantize_weights(p_.pattern, t.weights, ws.weights_q(), ws.weight_scale(),
                                           nt);
                const float src_scale = s8::quantized_src(t, p_.src_elems(), ws.src_q(), nt,
                                                          portable::quantize_rne);
                ws.set_src_scale(src_scale);
                if (lin)
                    ref::linear_fwd_s8(p_.pattern, ws.weights_q(), ws.weight_scale(), ws.src_q(),
                                       src_scale, t.bias, t.dst, p_.batch, nt);
                else
                    ref::conv2d_fwd_s8(p_.conv, p_.pattern, ws.weights_q(), ws.weight_scale(),
                                       ws.src_q(), src_scale, t.bias, t.dst, nt);
                break;
            }
            case direction::backward_data: {
                const s8::workspace_view &ws = t.workspace;
                std::vector<int8_t> g2(static_cast<size_t>(p_.dst_elems()));
                const float g2_scale = portable::quantize_stochastic(
                        t.diff_dst, p_.dst_elems(), ws.weight_scale(), p_.channels(),
                        p_.channel_inner(), s8::dx_stream(t.seed), g2.data(), nt);
                if (lin)
                    ref::linear_bwd_data_s8(p_.pattern, ws.weights_q(), g2.data(), g2_scale,
                                            t.diff_src, p_.batch, nt);
                else
                    ref::conv2d_bwd_data_s8(p_.conv, p_.pattern, transposed_, ws.weights_q(),
                                            g2.data(), g2_scale, t.diff_src, nt);
                break;
            }
            case direction::backward_weights: {
                const s8::workspace_view &ws = t.workspace;
                std::vector<int8_t> g1(static_cast<size_t>(p_.dst_elems()));
                const float g1_scale =
                        portable::quantize_stochastic(t.diff_dst, p_.dst_elems(), nullptr, 1, 1,
                                                      s8::dw_stream(t.seed), g1.data(), nt);
                if (lin)
                    ref::linear_bwd_weights_s8(p_.pattern, ws.plain_src_q(), ws.src_scale(),
                                               g1.data(), g1_scale, t.diff_weights, p_.batch, nt);
                else
                    ref::conv2d_bwd_weights_s8(p_.conv, p_.pattern, ws.plain_src_q(),
                                               ws.src_scale(), g1.data(), g1_scale, t.diff_weights,
                                               nt);
                break;
            }
        }
    }

    problem p_;
    ref::conv2d_transposed_pattern transposed_;
};

} // namespace

implementation ref_implementation() {
    return {"ref:any", [](const problem &) { return std::string(); },
            [](const problem &p) -> std::shared_ptr<const kernel> {
                return std::make_shared<const ref_kernel>(p);
            },
            /*is_reference=*/true, /*op=*/std::nullopt};
}

} // namespace qsp::detail
