// The reference implementation as a dispatchable kernel: quantization passes
// (s8) around the reference loops. Accepts every valid problem.
#include <cstring>
#include <vector>

#include "primitives/primitive_impl.hpp"
#include "primitives/ref/ref_implementation.hpp"
#include "qsparseprop/quantization.hpp"

namespace qsp::detail {

namespace {

struct workspace_view {
    float *scale;
    int8_t *src_q;
};

workspace_view view(uint8_t *ws) {
    return {reinterpret_cast<float *>(ws), reinterpret_cast<int8_t *>(ws + workspace_header_bytes)};
}

class ref_kernel : public kernel {
public:
    explicit ref_kernel(const problem &p) : p_(p) {
        if (p.op == op_kind::conv2d && p.dir == direction::backward_data)
            transposed_ = ref::transpose_conv2d_pattern(p.pattern);
    }

    void execute(const tensors &t) const override {
        if (p_.scheme == quant_scheme::f32)
            execute_f32(t);
        else
            execute_s8(t);
        if (p_.dir == direction::backward_weights && t.diff_bias)
            ref::bias_grad(t.diff_dst, t.diff_bias, p_.outer(), p_.channels(), p_.channel_inner(),
                           p_.num_threads);
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
        const int64_t nnz = p_.pattern.nnz();
        switch (p_.dir) {
            case direction::forward: {
                std::vector<int8_t> wq(static_cast<size_t>(nnz));
                std::vector<float> w_scale(static_cast<size_t>(p_.pattern.rows()));
                ref::quantize_weights(p_.pattern, t.weights, wq.data(), w_scale.data(), nt);
                std::vector<int8_t> local;
                int8_t *src_q;
                if (t.workspace) {
                    src_q = view(t.workspace).src_q;
                } else {
                    local.resize(static_cast<size_t>(p_.src_elems()));
                    src_q = local.data();
                }
                const float src_scale = ref::quantize_rne(t.src, p_.src_elems(), src_q, nt);
                if (t.workspace) std::memcpy(view(t.workspace).scale, &src_scale, sizeof(float));
                if (lin)
                    ref::linear_fwd_s8(p_.pattern, wq.data(), w_scale.data(), src_q, src_scale,
                                       t.bias, t.dst, p_.batch, nt);
                else
                    ref::conv2d_fwd_s8(p_.conv, p_.pattern, wq.data(), w_scale.data(), src_q,
                                       src_scale, t.bias, t.dst, nt);
                break;
            }
            case direction::backward_data: {
                std::vector<int8_t> wq(static_cast<size_t>(nnz));
                std::vector<float> w_scale(static_cast<size_t>(p_.pattern.rows()));
                ref::quantize_weights(p_.pattern, t.weights, wq.data(), w_scale.data(), nt);
                std::vector<int8_t> g2(static_cast<size_t>(p_.dst_elems()));
                const float g2_scale = ref::quantize_stochastic(
                        t.diff_dst, p_.dst_elems(), w_scale.data(), p_.channels(),
                        p_.channel_inner(), rounding_seed32(2 * t.seed + 1), g2.data(), nt);
                if (lin)
                    ref::linear_bwd_data_s8(p_.pattern, wq.data(), g2.data(), g2_scale, t.diff_src,
                                            p_.batch, nt);
                else
                    ref::conv2d_bwd_data_s8(p_.conv, p_.pattern, transposed_, wq.data(), g2.data(),
                                            g2_scale, t.diff_src, nt);
                break;
            }
            case direction::backward_weights: {
                float src_scale;
                std::memcpy(&src_scale, view(t.workspace).scale, sizeof(float));
                const int8_t *src_q = view(t.workspace).src_q;
                std::vector<int8_t> g1(static_cast<size_t>(p_.dst_elems()));
                const float g1_scale =
                        ref::quantize_stochastic(t.diff_dst, p_.dst_elems(), nullptr, 1, 1,
                                                 rounding_seed32(2 * t.seed), g1.data(), nt);
                if (lin)
                    ref::linear_bwd_weights_s8(p_.pattern, src_q, src_scale, g1.data(), g1_scale,
                                               t.diff_weights, p_.batch, nt);
                else
                    ref::conv2d_bwd_weights_s8(p_.conv, p_.pattern, src_q, src_scale, g1.data(),
                                               g1_scale, t.diff_weights, nt);
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
            }};
}

} // namespace qsp::detail
