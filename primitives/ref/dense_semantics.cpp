#include "primitives/ref/dense_semantics.hpp"

#include <cmath>
#include <cstdint>
#include <vector>

#include "primitives/core/kept_layout.hpp"
#include "primitives/ref/ref_kernels.hpp"

namespace qsp::detail {

namespace {

bool all_finite(const float *x, int64_t n, int num_threads) {
    // An Inf or NaN has every exponent bit set: an integer test the
    // compiler vectorises (std::isfinite is a call per element).
    const auto *bits = reinterpret_cast<const uint32_t *>(x);
    uint32_t bad = 0;
#pragma omp parallel for simd num_threads(num_threads) reduction(| : bad) schedule(static)
    for (int64_t i = 0; i < n; ++i)
        bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
    return !bad;
}

void execute_with_dense_weights(const problem &p, const tensors &t) {
    const int64_t rows = p.pattern.rows(), cols = p.pattern.cols();
    std::vector<uint8_t> everything(static_cast<size_t>(rows * cols), 1);
    const csr_pattern full = csr_pattern::from_mask(everything.data(), rows, cols);
    std::vector<float> dense(static_cast<size_t>(rows * cols));
    p.pattern.scatter(t.weights, dense.data());
    const int nt = p.num_threads;
    if (p.op == op_kind::linear) {
        if (p.dir == direction::forward)
            ref::linear_fwd_f32(full, dense.data(), t.src, t.bias, t.dst, t.batch, nt);
        else
            ref::linear_bwd_data_f32(full, dense.data(), t.diff_dst, t.diff_src, t.batch, nt);
    } else {
        if (p.dir == direction::forward)
            ref::conv2d_fwd_f32(p.conv, full, dense.data(), t.src, t.bias, t.dst, nt);
        else
            ref::conv2d_bwd_data_f32(p.conv, full, ref::transpose_conv2d_pattern(full),
                                     dense.data(), t.diff_dst, t.diff_src, nt);
    }
}

class dense_semantics_guard : public kernel {
public:
    dense_semantics_guard(const problem &p, std::shared_ptr<const kernel> inner)
        : p_(p), inner_(std::move(inner)) {}

    const char *execute(const tensors &t) const override {
        if (inner_->checks_finite_input()) {
            const char *ran = inner_->execute(t);
            if (ran != kernel::non_finite_input) return ran;
        } else {
            const bool fwd = p_.dir == direction::forward;
            const float *in = fwd ? t.src : t.diff_dst;
            const bool kept = fwd ? t.src_kept : t.dst_kept; // padding zero: finite
            const int64_t n = kept ? kept_elems(t.batch, fwd ? p_.in : p_.out)
                                   : (fwd ? p_.src_elems() : p_.dst_elems());
            if (all_finite(in, n, p_.num_threads)) return inner_->execute(t);
        }
        run_on_plain_layout(p_, t, t.src_kept, t.dst_kept, [this](const tensors &plain) {
            execute_with_dense_weights(p_, plain);
            return "";
        });
        return "ref:dense_semantics";
    }

private:
    problem p_;
    std::shared_ptr<const kernel> inner_;
};

} // namespace

std::shared_ptr<const kernel> with_dense_semantics(const problem &p,
                                                   std::shared_ptr<const kernel> inner) {
    if (p.scheme != quant_scheme::f32 || p.dir == direction::backward_weights) return inner;
    return std::make_shared<const dense_semantics_guard>(p, std::move(inner));
}

} // namespace qsp::detail
