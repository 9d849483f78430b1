#include "primitives/nonfinite.hpp"

#include <cmath>
#include <vector>

namespace qsp::detail {

namespace {

bool all_finite(const float *x, int64_t n, int num_threads) {
    int bad = 0;
#pragma omp parallel for num_threads(num_threads) reduction(| : bad) schedule(static)
    for (int64_t i = 0; i < n; ++i)
        bad |= !std::isfinite(x[i]);
    return !bad;
}

} // namespace

bool needs_dense_semantics(const problem &p, const tensors &t) {
    if (p.scheme != quant_scheme::f32) return false;
    if (p.dir == direction::forward) return !all_finite(t.src, p.src_elems(), p.num_threads);
    if (p.dir == direction::backward_data)
        return !all_finite(t.diff_dst, p.dst_elems(), p.num_threads);
    return false; // dW is only wanted at the nonzeros: sparse == dense there
}

void execute_with_dense_semantics(const problem &p, const tensors &t) {
    const int64_t rows = p.pattern.rows(), cols = p.pattern.cols();
    std::vector<uint8_t> everything(static_cast<size_t>(rows * cols), 1);
    const csr_pattern full = csr_pattern::from_mask(everything.data(), rows, cols);
    std::vector<float> dense(static_cast<size_t>(rows * cols));
    p.pattern.scatter(t.weights, dense.data());
    const int nt = p.num_threads;
    if (p.op == op_kind::linear) {
        if (p.dir == direction::forward)
            ref::linear_fwd_f32(full, dense.data(), t.src, t.bias, t.dst, p.batch, nt);
        else
            ref::linear_bwd_data_f32(full, dense.data(), t.diff_dst, t.diff_src, p.batch, nt);
    } else {
        if (p.dir == direction::forward)
            ref::conv2d_fwd_f32(p.conv, full, dense.data(), t.src, t.bias, t.dst, nt);
        else
            ref::conv2d_bwd_data_f32(p.conv, full, ref::transpose_conv2d_pattern(full),
                                     dense.data(), t.diff_dst, t.diff_src, nt);
    }
}

} // namespace qsp::detail
