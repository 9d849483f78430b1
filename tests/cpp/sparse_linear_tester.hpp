// XNNPACK-style tester: SparseLinearTester().batch(..).in(..).out(..)
// .sparsity(..).Test() runs the three f32 primitives and compares them with a
// naive dense computation in double.
#pragma once

#include <string>

#include "test_utils.hpp"

namespace qsp::test {

class SparseLinearTester {
public:
    SparseLinearTester &batch(int64_t v) {
        batch_ = v;
        return *this;
    }
    SparseLinearTester &in(int64_t v) {
        in_ = v;
        return *this;
    }
    SparseLinearTester &out(int64_t v) {
        out_ = v;
        return *this;
    }
    SparseLinearTester &sparsity(double v) {
        sparsity_ = v;
        return *this;
    }
    SparseLinearTester &threads(int v) {
        threads_ = v;
        return *this;
    }
    SparseLinearTester &bias(bool v) {
        bias_ = v;
        return *this;
    }
    SparseLinearTester &seed(unsigned v) {
        seed_ = v;
        return *this;
    }

    void Test() const {
        SCOPED_TRACE("B=" + std::to_string(batch_) + " K=" + std::to_string(in_)
                     + " N=" + std::to_string(out_) + " sparsity=" + std::to_string(sparsity_)
                     + " threads=" + std::to_string(threads_));
        std::mt19937 rng(seed_);
        const int64_t B = batch_, K = in_, N = out_;
        auto dense_w = random_sparse_dense(N, K, sparsity_, rng);
        auto w = csr_weights::from_dense(dense_w.data(), N, K);
        auto x = random_vector(static_cast<size_t>(B * K), rng);
        auto dy = random_vector(static_cast<size_t>(B * N), rng);
        auto b = random_vector(static_cast<size_t>(N), rng);

        dnnl::engine eng(dnnl::engine::kind::cpu, 0);
        dnnl::stream strm(eng);
        primitive_attr attr;
        attr.num_threads = threads_;
        const auto src_md = f32_desc({B, K}), dst_md = f32_desc({B, N});
        const auto bias_md = bias_ ? f32_desc({N}) : dnnl::memory::desc();
        sparse_linear_forward::primitive_desc fwd_pd(eng, prop_kind::forward_training, src_md,
                                                     w.pattern, bias_md, dst_md, quant_scheme::f32,
                                                     attr);
        std::vector<float> y(static_cast<size_t>(B * N), -7.f);
        exec_args fwd_args{{DNNL_ARG_SRC, wrap(eng, src_md, x.data())},
                           {DNNL_ARG_WEIGHTS, wrap(eng, fwd_pd.weights_desc(), w.values.data())},
                           {DNNL_ARG_DST, wrap(eng, dst_md, y.data())}};
        if (bias_) fwd_args[DNNL_ARG_BIAS] = wrap(eng, bias_md, b.data());
        sparse_linear_forward(fwd_pd).execute(strm, fwd_args);

        sparse_linear_backward_data::primitive_desc bwd_d_pd(eng, src_md, w.pattern, dst_md,
                                                             fwd_pd);
        std::vector<float> dx(static_cast<size_t>(B * K), -7.f);
        sparse_linear_backward_data(bwd_d_pd).execute(
                strm, {{DNNL_ARG_DIFF_DST, wrap(eng, dst_md, dy.data())},
                       {DNNL_ARG_WEIGHTS, wrap(eng, fwd_pd.weights_desc(), w.values.data())},
                       {DNNL_ARG_DIFF_SRC, wrap(eng, src_md, dx.data())}});

        sparse_linear_backward_weights::primitive_desc bwd_w_pd(eng, src_md, w.pattern, bias_md,
                                                                dst_md, fwd_pd);
        std::vector<float> dw(static_cast<size_t>(w.pattern.nnz()), -7.f),
                db(static_cast<size_t>(N), -7.f);
        exec_args bw_args{{DNNL_ARG_SRC, wrap(eng, src_md, x.data())},
                          {DNNL_ARG_DIFF_DST, wrap(eng, dst_md, dy.data())},
                          {DNNL_ARG_DIFF_WEIGHTS, wrap(eng, fwd_pd.weights_desc(), dw.data())}};
        if (bias_) bw_args[DNNL_ARG_DIFF_BIAS] = wrap(eng, bias_md, db.data());
        sparse_linear_backward_weights(bwd_w_pd).execute(strm, bw_args);

        // Naive dense oracle in double.
        std::vector<double> y_ref(y.size()), y_mag(y.size()), dx_ref(dx.size()), dx_mag(dx.size());
        for (int64_t i = 0; i < B; ++i)
            for (int64_t n = 0; n < N; ++n) {
                double acc = bias_ ? b[n] : 0, mag = bias_ ? std::fabs(b[n]) : 0;
                for (int64_t k = 0; k < K; ++k) {
                    acc += double(x[i * K + k]) * dense_w[n * K + k];
                    mag += std::fabs(double(x[i * K + k]) * dense_w[n * K + k]);
                }
                y_ref[i * N + n] = acc;
                y_mag[i * N + n] = mag;
            }
        for (int64_t i = 0; i < B; ++i)
            for (int64_t k = 0; k < K; ++k) {
                double acc = 0, mag = 0;
                for (int64_t n = 0; n < N; ++n) {
                    acc += double(dy[i * N + n]) * dense_w[n * K + k];
                    mag += std::fabs(double(dy[i * N + n]) * dense_w[n * K + k]);
                }
                dx_ref[i * K + k] = acc;
                dx_mag[i * K + k] = mag;
            }
        std::vector<double> dw_ref(dw.size()), dw_mag(dw.size());
        const int64_t *rp = w.pattern.row_ptr();
        const int32_t *ci = w.pattern.col_idx();
        for (int64_t n = 0; n < N; ++n)
            for (int64_t e = rp[n]; e < rp[n + 1]; ++e) {
                double acc = 0, mag = 0;
                for (int64_t i = 0; i < B; ++i) {
                    acc += double(dy[i * N + n]) * x[i * K + ci[e]];
                    mag += std::fabs(double(dy[i * N + n]) * x[i * K + ci[e]]);
                }
                dw_ref[e] = acc;
                dw_mag[e] = mag;
            }
        expect_close(y, y_ref, y_mag, 1e-5, "forward dst");
        expect_close(dx, dx_ref, dx_mag, 1e-5, "backward_data diff_src");
        expect_close(dw, dw_ref, dw_mag, 1e-5, "backward_weights diff_weights");
        if (bias_) {
            std::vector<double> db_ref(static_cast<size_t>(N)), db_mag(static_cast<size_t>(N));
            for (int64_t n = 0; n < N; ++n)
                for (int64_t i = 0; i < B; ++i) {
                    db_ref[n] += dy[i * N + n];
                    db_mag[n] += std::fabs(dy[i * N + n]);
                }
            expect_close(db, db_ref, db_mag, 1e-5, "backward_weights diff_bias");
        }
    }

private:
    int64_t batch_ = 4, in_ = 8, out_ = 8;
    double sparsity_ = 0.9;
    int threads_ = 2;
    bool bias_ = true;
    unsigned seed_ = 1;
};

} // namespace qsp::test
