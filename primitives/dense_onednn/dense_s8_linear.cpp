// "dense:onednn_s8": the s8 scheme for Linear on oneDNN's int8 matmul (AMX,
// VNNI or whatever oneDNN picks), beside the sparse JIT: on CPUs with AMX
// oneDNN's dense int8 beats sparse code at moderate sparsity, and the tuner
// decides per layer and direction. The quantized weights are scattered into a dense
// int8 matrix per call (they change every optimizer step); the three
// products run dense with int32 outputs, and the epilogues apply the scheme's
// scales exactly as the reference does, so the results equal the reference
// bit for bit.
#include <algorithm>
#include <cstring>
#include <memory>

#include <omp.h>

#include "primitives/core/s8_dy_quantization.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "primitives/dense_onednn/dense_s8_linear.hpp"
#include "primitives/dense_onednn/onednn_common.hpp"
#include "primitives/passes/bias_grad.hpp"
#include "primitives/passes/quantize.hpp"
#include "qsparseprop/runtime.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

namespace {

using dt = dnnl::memory::data_type;

dnnl::memory::desc strided(const dnnl::memory::dims &dims, dt type,
                           const dnnl::memory::dims &strides) {
    return dnnl::memory::desc(dims, type, strides);
}

class dense_s8_linear_kernel : public kernel {
public:
    explicit dense_s8_linear_kernel(const problem &p) : p_(p), engine_(dnnl::engine::kind::cpu, 0) {
        const int64_t B = p.batch, K = p.in, N = p.out;
        dnnl::primitive_attr attr;
        // oneDNN's scratch comes from our pool (and goes back to it), like ours.
        attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
        switch (p.dir) {
            case direction::forward: // Xq[B,K] * Wq^T -> [B,N]
                a_md_ = strided({B, K}, dt::s8, {K, 1});
                b_md_ = strided({K, N}, dt::s8, {1, K});
                c_md_ = strided({B, N}, dt::s32, {N, 1});
                break;
            case direction::backward_data: // G2[B,N] * Wq[N,K] -> [B,K]
                a_md_ = strided({B, N}, dt::s8, {N, 1});
                b_md_ = strided({N, K}, dt::s8, {K, 1});
                c_md_ = strided({B, K}, dt::s32, {K, 1});
                break;
            case direction::backward_weights: // G1^T[N,B] * Xq[B,K] -> [N,K]
                a_md_ = strided({N, B}, dt::s8, {1, N});
                b_md_ = strided({B, K}, dt::s8, {K, 1});
                c_md_ = strided({N, K}, dt::s32, {K, 1});
                break;
        }
        matmul_pd_ = dnnl::matmul::primitive_desc(engine_, a_md_, b_md_, c_md_, attr);
        matmul_ = dnnl::matmul(matmul_pd_);
    }

    // Backward-weights reads G1 as plain int8 (s8_dy_quantization.hpp).
    shared_gradient::form shared_form_read() const override {
        return p_.dir == direction::backward_weights ? shared_gradient::form::s8_plain_dy_q
                                                     : shared_gradient::form::none;
    }

    const char *execute(const tensors &t) const override {
        runtime::scratchpad sp;
        const int nt = p_.num_threads;
        const int64_t B = p_.batch, K = p_.in, N = p_.out, nnz = p_.pattern.nnz();
        // Quantized weights (per output channel): the forward quantizes them
        // (into the workspace when training), backward-data reads the
        // forward's copy, backward-weights has none.
        const s8::workspace_view &ws = t.workspace;
        int8_t *wq = t.workspace ? ws.weights_q() : sp.get<int8_t>(0, nnz);
        float *w_scale = t.workspace ? ws.weight_scale() : sp.get<float>(1, N);
        if (p_.dir == direction::forward) quantize_weights(p_.pattern, t.weights, wq, w_scale, nt);
        const int64_t *rp = p_.pattern.row_ptr();
        const int32_t *ci = p_.pattern.col_idx();
        int32_t *acc = sp.get<int32_t>(2, static_cast<int64_t>(p_.dir == direction::forward ? B * N
                                                               : p_.dir == direction::backward_data
                                                                       ? B * K
                                                                       : N * K));
        switch (p_.dir) {
            case direction::forward: {
                int8_t *wd = dense_weights(wq, sp);
                int8_t *xq =
                        t.workspace ? ws.src_q() : sp.get<int8_t>(3, static_cast<int64_t>(B * K));
                const float sx = quantize_rne(t.src, B * K, xq, t.src_abs_max, nt);
                if (t.workspace) ws.set_src_scale(sx);
                run(xq, wd, acc, sp);
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t b = 0; b < B; ++b)
                    for (int64_t n = 0; n < N; ++n)
                        t.dst[b * N + n] = static_cast<float>(acc[b * N + n])
                                                   * s8::forward_scale(sx, w_scale[n])
                                           + (t.bias ? t.bias[n] : 0.f);
                break;
            }
            case direction::backward_data: {
                int8_t *wd = dense_weights(wq, sp);
                int8_t *g2 = sp.get<int8_t>(3, static_cast<int64_t>(B * N));
                const float sg2 = s8::quantize_dx_gradient(t, B * N, w_scale, N, 1, g2, nt);
                run(g2, wd, acc, sp);
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t i = 0; i < B * K; ++i)
                    t.diff_src[i] = static_cast<float>(acc[i]) * sg2;
                break;
            }
            case direction::backward_weights: {
                const auto [g1, sg1] = s8::quantize_dw_gradient(
                        t, B * N, N, sp.get<int8_t>(3, static_cast<int64_t>(B * N)), nt);
                run(g1, ws.plain_src_q(), acc, sp);
                const float scale = s8::backward_weights_scale(sg1, ws.src_scale());
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t n = 0; n < N; ++n)
                    for (int64_t e = rp[n]; e < rp[n + 1]; ++e)
                        t.diff_weights[e] = static_cast<float>(acc[n * K + ci[e]]) * scale;
                if (t.diff_bias) bias_grad(t.diff_dst, t.diff_bias, B, N, 1, nt);
                break;
            }
        }
        return nullptr;
    }

private:
    int8_t *dense_weights(const int8_t *wq, runtime::scratchpad &sp) const {
        int8_t *dense = sp.get<int8_t>(4, static_cast<int64_t>(p_.out * p_.in));
        scatter_dense_s8(p_.pattern, wq, dense, p_.num_threads);
        return dense;
    }

    void run(const void *a, const void *b, int32_t *c, runtime::scratchpad &sp) const {
        dnnl::memory am(a_md_, engine_, const_cast<void *>(a)),
                bm(b_md_, engine_, const_cast<void *>(b)), cm(c_md_, engine_, c);
        const auto scratch_md = matmul_pd_.scratchpad_desc();
        dnnl::memory scratch(scratch_md, engine_,
                             sp.bytes(5, std::max<size_t>(scratch_md.get_size(), 1)));
        omp_threads_guard guard(p_.num_threads);
        const auto timed = kernel_time(p_.dir);
        dnnl::stream stream(engine_); // per call: executions may run concurrently
        matmul_.execute(stream, {{DNNL_ARG_SRC, am},
                                 {DNNL_ARG_WEIGHTS, bm},
                                 {DNNL_ARG_DST, cm},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
        stream.wait();
    }

    problem p_;
    dnnl::engine engine_;
    dnnl::memory::desc a_md_, b_md_, c_md_;
    dnnl::matmul::primitive_desc matmul_pd_;
    dnnl::matmul matmul_;
};

} // namespace

bool onednn_int8_is_exact() {
    const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
    const unsigned avx2_vnni_bit = dnnl_cpu_isa_avx2_vnni & ~unsigned(dnnl_cpu_isa_avx2);
    const unsigned avx512_vnni_bit =
            dnnl_cpu_isa_avx512_core_vnni & ~unsigned(dnnl_cpu_isa_avx512_core);
    return (isa & (avx2_vnni_bit | avx512_vnni_bit)) != 0;
}

void scatter_dense_s8(const csr_pattern &p, const int8_t *wq, int8_t *dense, int num_threads) {
    const int64_t cols = p.cols();
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < p.rows(); ++n) {
        std::memset(dense + n * cols, 0, static_cast<size_t>(cols));
        for (int64_t e = rp[n]; e < rp[n + 1]; ++e)
            dense[n * cols + ci[e]] = wq[e];
    }
}

implementation dense_onednn_s8_linear_implementation() {
    return {"dense:onednn_s8",
            [](const problem &p) -> std::string {
                if (p.scheme != quant_scheme::s8) return "s8 only";
                if (effective_cpu_isa() == cpu_isa::ref)
                    return "QSP_MAX_CPU_ISA=ref selects the reference";
                static const bool exact = onednn_int8_is_exact();
                if (!exact)
                    return "oneDNN's int8 matmul on this CPU has no VNNI/AMX: its int16 "
                           "intermediate sums saturate, results would not be exact";
                const int64_t reduction = p.dir == direction::forward         ? p.in
                                          : p.dir == direction::backward_data ? p.out
                                                                              : p.batch;
                if (reduction > int32_safe_reduction_length)
                    return "reduction of " + std::to_string(reduction)
                           + " terms could overflow oneDNN's int32 accumulator";
                if (p.out * p.in > (int64_t(1) << 31)) return "dense weights over 2 GiB";
                return "";
            },
            [](const problem &p) -> std::shared_ptr<const kernel> {
                return std::make_shared<const dense_s8_linear_kernel>(p);
            },
            false, op_kind::linear};
}

} // namespace qsp::detail
